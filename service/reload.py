"""New model versions without a restart: when the server rescans its repository.

Every repository_poll_seconds (when > 0), on SIGHUP, and once right after start (for what changed while
the server was loading), one rescan at a time: asked again while one runs, another follows it. What a
rescan serves, and how a version leaves, is vaeserve.service.models' part (ModelRegistry.rescan and
serve, ServedModel.retire). Reading and opening run in a thread; the swap runs on the event loop. Health
is never touched.
"""

import asyncio
import logging

from vaeserve.errors import ArtifactError
from vaeserve.service.models import ModelRegistry

log = logging.getLogger(__name__)


class RepositoryWatcher:
    def __init__(self, registry: ModelRegistry, poll_seconds: float):
        self.registry, self.poll_seconds = registry, poll_seconds
        self._asked = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()  # versions waiting for their requests; held so they are not collected
        self._problem: str | None = None  # the last rescan failure logged: a lasting one is logged once

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="repository watcher")

    def rescan_soon(self) -> None:
        """Ask for a rescan (SIGHUP); asked several times while one runs, one more follows."""
        self._asked.set()

    async def stop(self) -> None:
        """No rescan runs or starts after this. Versions already leaving go on waiting for their requests."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # a thread reading a version finishes on its own; its result is dropped

    async def _watch(self) -> None:
        while True:
            self._asked.clear()
            await self._rescan()
            try:
                async with asyncio.timeout(self.poll_seconds or None):
                    await self._asked.wait()
            except TimeoutError:
                pass

    async def _rescan(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            models = await loop.run_in_executor(None, self.registry.rescan)
        except Exception as err:  # the repository unreadable or gone: what is served stays
            if str(err) != self._problem:
                log.error("cannot rescan %s, serving what was loaded: %s", self.registry.settings.repository, err,
                          exc_info=not isinstance(err, OSError | ArtifactError))  # fmt: skip
            self._problem = str(err)
            return
        self._problem = None
        if models is None:
            return
        try:
            leaving = self.registry.serve(models)
        except Exception:  # a bug, not a bad file: say so, and keep watching
            log.exception("cannot swap in the rescanned versions; serving what was loaded")
            return
        for model in leaving:
            task = loop.create_task(model.retire(), name=f"retire {model.name} version {model.version}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
