"""Bad input gets a clear error and the daemon keeps serving everyone else."""

from __future__ import annotations

import pickle

import pytest

from managerd_client import ForbiddenPayload, NoSuchObject, ObjectTypeConflict

from conftest import Daemon


def test_unknown_type_is_a_clear_error(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        with pytest.raises(TypeError, match="unknown type 'Nope'"):
            m._create("Nope", uniq, {})
        m.ping()


def test_unknown_method_is_a_clear_error(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        with pytest.raises(AttributeError, match="Queue has no method 'explode'"):
            q._call("explode")
        q.put(1)
        assert q.get() == 1


def test_wrong_argument_types(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        with pytest.raises(TypeError):
            q._call("put", "not-bytes")
        with pytest.raises(TypeError):
            q._call("get", True, None, "extra", "args")
        with pytest.raises(ValueError, match="non-negative"):
            q.get(timeout=-1)
        with pytest.raises(TypeError, match="maxsize"):
            m.Queue(uniq + "x", maxsize="big")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="name must be a str"):
            m._create("Queue", 42, {})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="printable"):
            m._create("Queue", "", {})
        assert q.qsize() == 0


def test_name_taken_by_other_type(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        m.Queue(uniq)
        with pytest.raises(ObjectTypeConflict, match="already exists as a Queue"):
            m.dict(uniq)


def test_deleted_object(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        q = m.Queue(uniq)
        m.delete(uniq)
        with pytest.raises(NoSuchObject, match="no object named"):
            q.put(1)
        with pytest.raises(KeyError):  # NoSuchObject is a KeyError too
            q.qsize()


class Custom:
    """A class the daemon does not trust as a dict key."""

    def __hash__(self) -> int:
        return 1


def test_non_builtin_key_is_refused(shared_daemon: Daemon, uniq: str) -> None:
    with shared_daemon.connect() as m:
        d = m.dict(uniq)
        with pytest.raises(
            ForbiddenPayload, match="builtin data types, and the classes its allowed_classes"
        ):
            d[Custom()] = 1
        # Values of any picklable class are fine: they stay opaque bytes.
        d["k"] = Custom()
        assert isinstance(d["k"], Custom)
        # A pickle that would run code is refused before anything is called.
        with pytest.raises(ForbiddenPayload):
            m._call(None, None, "ping", (pickle.loads,))
        m.ping()
