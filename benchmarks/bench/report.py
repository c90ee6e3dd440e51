"""The report: ratios between systems, the issue's targets, the printed tables, the JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.plan import Plan


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3) if abs(value) < 100 else round(value)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def ratios(results: dict[str, dict[str, Any]], others: Sequence[str] = ()) -> None:
    """Add ``managerd/stock``, ``managerd/floor`` and ``managerd/<other>`` for each other label."""
    for r in results.values():
        md, stock, floor = r.get("managerd"), r.get("stock"), r.get("floor")
        r["managerd/stock"] = md / stock if md and stock else None
        r["managerd/floor"] = md / floor if md and floor else None
        for label in others:
            other = r.get(label)
            r[f"managerd/{label}"] = md / other if md and other else None


def targets(results: dict[str, dict[str, Any]], plan: Plan, batch: int) -> list[dict[str, Any]]:
    """The issue's targets next to what was measured (None: not run)."""

    def get(key: str, field: str) -> Any:
        return results.get(key, {}).get(field)

    def t(what: str, measured: Any, met: bool | None) -> dict[str, Any]:
        return {"target": what, "measured": measured, "met": met}

    out = []
    for key in ("noop_ping", "noop_value_get"):
        f, s = get(key, "managerd/floor"), get(key, "managerd/stock")
        out.append(t(f"{key}: >= 0.8x floor", f, None if f is None else f >= 0.8))
        out.append(t(f"{key}: >= stock", s, None if s is None else s >= 1.0))
    c = get("connect_first_call_ms", "managerd")
    out.append(t("connect + first call < 5 ms (median)", c, None if c is None else c < 5))
    rt = get("roundtrip_32KB_ms", "managerd")
    out.append(t("32 KB round trip < 1 ms (p50)", rt, None if rt is None else rt < 1))
    r8 = get("queue_8p8c_100B", "managerd/stock")
    out.append(t("8 producers/8 consumers >= 2x stock", r8, None if r8 is None else r8 >= 2))
    b = get(f"batch_{batch}_1p1c_100B", "managerd")
    out.append(t("put_many/get_many >= 500,000 msgs/s", b, None if b is None else b >= 500_000))
    bs = get(f"batch_{batch}_1p1c_100B", "managerd/stock")
    out.append(t("put_many/get_many >= 30x stock single put/get", bs,
                 None if bs is None else bs >= 30))  # fmt: skip
    n = plan.idle_clients
    rss = get(f"idle_{n}_server_rss_mb", "managerd")
    out.append(t(f"{n} idle clients: daemon RSS < 150 MB", rss, None if rss is None else rss < 150))
    p99 = get(f"idle_{n}_other_call_p99_ms", "managerd")
    out.append(t(f"{n} idle clients: another call p99 < 2 ms", p99,
                 None if p99 is None else p99 < 2))  # fmt: skip
    acc = get(f"connections_{plan.many_connections}_accepted", "managerd")
    out.append(t(f"{plan.many_connections} connections accepted", acc,
                 None if acc is None else acc >= plan.many_connections))  # fmt: skip
    imp = get("client_imports", "ok")
    out.append(t("client pulls in no third-party module", imp, imp))
    return out


def fmt(v: Any) -> str:
    """A figure for the tables: 3 significant-ish digits when small, thousands separated."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float) and abs(v) < 10:
        return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
    return f"{v:,.0f}"


def print_table(results: dict[str, dict[str, Any]], goals: list[dict[str, Any]]) -> None:
    head = f"{'workload':<32}{'unit':<26}{'floor':>11}{'stock':>11}{'managerd':>11}"
    print(f"\n{head}{'md/stock':>10}{'md/floor':>10}  better")
    for key, r in results.items():
        print(f"{key:<32}{r['unit']:<26}{fmt(r.get('floor')):>11}{fmt(r.get('stock')):>11}"
              f"{fmt(r.get('managerd')):>11}{fmt(r.get('managerd/stock')):>10}"
              f"{fmt(r.get('managerd/floor')):>10}  {r['better']}")  # fmt: skip
    print(f"\n{'per iteration: latency, CPU (µs), faults':<44}{'p50':>9}{'p99':>9}"
          f"{'server user+sys':>22}{'faults':>8}{'client user+sys':>22}{'faults':>8}")  # fmt: skip
    for key, r in results.items():
        for system, d in r.get("details", {}).items():
            if isinstance(d, dict) and "server_cpu_us_per_iter" in d:
                server = f"{d['server_user_us_per_iter']:.1f}+{d['server_sys_us_per_iter']:.1f}"
                client = f"{d['client_user_us_per_iter']:.1f}+{d['client_sys_us_per_iter']:.1f}"
                print(f"{key + ' ' + system:<44}{d['p50_us']:>9.1f}{d['p99_us']:>9.1f}"
                      f"{server:>22}{d['server_page_faults_per_iter']:>8.1f}"
                      f"{client:>22}{d['client_page_faults_per_iter']:>8.1f}")  # fmt: skip
    print(f"\n{'multi-process: CPU per message (µs)':<44}{'server':>9}{'all procs':>11}"
          f"{'server cores':>14}{'machine busy':>14}{'prod/cons cores':>17}")  # fmt: skip
    for key, r in results.items():
        for system, d in r.get("details", {}).items():
            if isinstance(d, dict) and "server_cpu_us_per_msg" in d:
                pc = (f"{d['producer_cores_busy']:.2f}/{d['consumer_cores_busy']:.2f}"
                      if "producer_cores_busy" in d else "-")  # fmt: skip
                print(f"{key + ' ' + system:<44}{d['server_cpu_us_per_msg']:>9.1f}"
                      f"{d['machine_cpu_us_per_msg']:>11.1f}{d['server_cores_busy']:>14.2f}"
                      f"{d['machine_busy_fraction']:>14.0%}{pc:>17}")  # fmt: skip
    print(f"\n{'target':<52}{'measured':>14}  met")
    for g in goals:
        print(f"{g['target']:<52}{fmt(g['measured']):>14}  {fmt(g['met'])}")


def print_comparison(results: dict[str, dict[str, Any]], others: list[str]) -> None:
    """This checkout's daemon against each other checkout's: figures and ``managerd/<other>``.

    Above 1 means this checkout's figure is the larger; ``better`` says
    whether that is good.
    """
    for label in others:
        print(f"\n{'workload':<32}{'unit':<26}{'managerd':>11}{label:>20}{'ratio':>8}  better")
        for key, r in results.items():
            if label not in r:
                continue
            print(f"{key:<32}{r['unit']:<26}{fmt(r.get('managerd')):>11}{fmt(r[label]):>20}"
                  f"{fmt(r.get(f'managerd/{label}')):>8}  {r['better']}")  # fmt: skip
