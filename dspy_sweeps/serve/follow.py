"""The served version and the alias it follows.

`Service` holds the version new requests go to; a request takes that reference once, at its start,
so a switch never touches a request in flight: it finishes on the version it started on, and the
old program is dropped when its last request ends. `AliasFollower` polls the registry and, when
the alias moves, loads the new version beside the old one and switches; a version that fails to
load leaves the old one serving, with one log line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pydantic import BaseModel

from dspy_sweeps.errors import first_line
from dspy_sweeps.serve.metrics import ServiceMetrics
from dspy_sweeps.serve.program import LoadedProgram, StudentConfig

log = logging.getLogger("dspy_sweeps.serve")


class ServiceConfig(BaseModel):
    """Everything a service (or a Ray Serve replica) needs to load and follow a registered program."""

    name: str
    alias: str | None = None  # None: a fixed version, nothing to follow
    version: str | None = None
    tracking_uri: str
    student: StudentConfig = StudentConfig()
    concurrency: int = 32  # predictions running at once; more wait their turn
    poll_s: float = 10.0  # how often the registry is asked where the alias points

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


class Service:
    def __init__(self, config: ServiceConfig, first: LoadedProgram) -> None:
        self.config, self._current = config, first
        self.metrics = ServiceMetrics(config.name, config.alias)
        self.metrics.serving(first.version)
        self.follower: AliasFollower | None = None

    @classmethod
    def start(cls, config: ServiceConfig) -> Service:
        """Load the version the reference names now, and follow its alias if it has one."""
        from dspy_sweeps.serve.program import alias_version, load_version

        version = config.version or alias_version(config.tracking_uri, config.name, config.alias or "")
        service = cls(config, load_version(config.tracking_uri, config.name, version, config.student))
        if config.alias:
            service.follower = AliasFollower(
                service, lambda v: load_version(config.tracking_uri, config.name, v, config.student)
            )
            service.follower.start()
        return service

    @property
    def current(self) -> LoadedProgram:
        return self._current

    def switch(self, loaded: LoadedProgram) -> None:
        previous, self._current = self._current, loaded  # one reference assignment: atomic for readers
        self.metrics.serving(loaded.version, previous.version)
        log.warning(
            "%s moved from v%s to v%s: new requests go to v%s, requests in flight finish on v%s",
            self.config.ref,
            previous.version,
            loaded.version,
            loaded.version,
            previous.version,
        )

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()


class AliasFollower(threading.Thread):
    def __init__(self, service: Service, load: Callable[[str], LoadedProgram]) -> None:
        super().__init__(name="alias-follower", daemon=True)
        self.service, self.load = service, load
        self._stopped = threading.Event()
        self._refused: set[str] = set()  # versions that failed to load: logged once, not retried
        self._registry_down = False

    def run(self) -> None:
        while not self._stopped.wait(self.service.config.poll_s):
            self.check()

    def stop(self) -> None:
        self._stopped.set()

    def check(self) -> None:
        """One poll: follow the alias if it moved to a version not yet tried."""
        from dspy_sweeps.serve.program import alias_version

        config = self.service.config
        try:
            version = alias_version(config.tracking_uri, config.name, config.alias or "")
        except Exception as exc:  # the registry is down or the alias was removed: keep serving
            if not self._registry_down:
                log.warning(
                    "%s: cannot read the alias (%s); still serving v%s",
                    config.ref,
                    first_line(exc),
                    self.service.current.version,
                )
            self._registry_down = True
            return
        self._registry_down = False
        if version == self.service.current.version or version in self._refused:
            return
        try:
            loaded = self.load(version)
            if loaded.inputs != self.service.current.inputs or loaded.fields != self.service.current.fields:
                raise ValueError(
                    f"its fields {loaded.fields} differ from the served {self.service.current.fields}; restart to serve it"
                )
        except Exception as exc:
            self._refused.add(version)
            self.service.metrics.load_failures.inc()
            log.error(
                "%s moved to v%s, which failed to load (%s); still serving v%s",
                config.ref,
                version,
                first_line(exc),
                self.service.current.version,
            )
            return
        self.service.switch(loaded)
