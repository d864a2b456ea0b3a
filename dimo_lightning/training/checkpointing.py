"""LinkedLastModelCheckpoint: a ModelCheckpoint whose ``last.ckpt`` links to the newest checkpoint file.

With ``save_last: true``, Lightning writes ``last.ckpt`` as a full checkpoint next to the top-k file of the same step:
for the step-based configs (every periodic checkpoint kept, or the best 3 by FID, which usually includes the newest
while FID improves) the newest state is on disk twice, 4.8 GB more for ImageNet. Lightning 2.6's ``save_last: link``
does not help: it links ``last.ckpt`` to the last file the callback saved, which is an older step's whenever the
newest state did not make the top k (``last.ckpt`` then resumes from the past), and that file is deleted once it
drops out of the top k (``last.ckpt`` then dangles).

Here every save leaves the newest state in exactly one file: the top-k checkpoint of that step when one was
written, else a checkpoint of its own under the same name pattern (deleted once a newer state exists, unless it
entered the top k meanwhile). ``last.ckpt`` is a relative symbolic link to it, so ``--ckpt_path last`` and
``--ckpt_path .../last.ckpt`` resume from the newest state. Nothing is ever unreachable: the new file is complete
before the link is swapped (a temporary link renamed over ``last.ckpt``, atomic on POSIX), and the file the link
pointed to is deleted only after the swap. A regular ``last.ckpt`` left by an earlier run in the same folder is kept
(the link is then ``last-v1.ckpt``, which Lightning's ``last`` lookup picks by its newer time). Where symbolic links
cannot be made (Windows without the privilege) ``last.ckpt`` is written in full, as Lightning does.

This overrides ModelCheckpoint's protected ``_save_last_checkpoint`` / ``_remove_checkpoint`` (Lightning 2.6; the
policy is checked by tests/test_checkpoint_policy.py): Lightning has no public hook for where ``last.ckpt`` points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LinkedLastModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) whose ``save_last`` is a link to the newest checkpoint file (module
    docstring). ``save_last`` defaults to true here; ``save_last: link`` means the same."""

    def __init__(self, *args: Any, save_last: bool | str | None = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=bool(save_last), **kwargs)
        self.newest_path = ""  # the file last.ckpt points to
        self.own_newest_path = ""  # that file when it is not a top-k checkpoint (deleted once superseded)
        self._deferred_removals: list[str] = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "newest_path": self.newest_path, "own_newest_path": self.own_newest_path}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.dirpath == state_dict.get("dirpath", self.dirpath):  # as ModelCheckpoint: paths of this folder only
            self.newest_path = state_dict.get("newest_path", "")
            self.own_newest_path = state_dict.get("own_newest_path", "")

    def _link_path(self, monitor_candidates: dict[str, Any], trainer) -> str:
        """``last.ckpt``, or ``last-vN.ckpt`` when a regular file (an earlier run's full copy) holds that name."""
        path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        version = self.STARTING_VERSION
        while self.file_exists(path, trainer) and not os.path.islink(path) and path != self.last_model_path:
            path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        return path

    @override
    def _save_last_checkpoint(self, trainer, monitor_candidates: dict[str, Any]) -> None:
        if not self.save_last:
            return
        link = self._link_path(monitor_candidates, trainer)
        self.last_model_path = link  # part of the state saved below, as in ModelCheckpoint
        superseded = self.own_newest_path
        # The newest state: the checkpoint this callback saved at this step (a top-k one), else a file of its own.
        if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved and (
                os.path.abspath(self._last_checkpoint_saved) != os.path.abspath(link)):
            target, self.own_newest_path = self._last_checkpoint_saved, ""
        else:
            target = self._get_metric_interpolated_filepath_name(monitor_candidates, trainer)
            self.own_newest_path = target
            self.newest_path = target
            self._save_checkpoint(trainer, target)
        self.newest_path = target
        if not self._point_link(trainer, link, target):  # no symbolic links here: a full last.ckpt, as Lightning's
            self.newest_path = ""
            super()._save_last_checkpoint(trainer, monitor_candidates)
            for path in (*self._deferred_removals, self.own_newest_path):  # now copies of older or the same state
                if path:
                    super()._remove_checkpoint(trainer, path)
            self._deferred_removals, self.own_newest_path = [], ""
            return
        # Only now that the link names the new file may the files it named before go.
        stale, self._deferred_removals = [*self._deferred_removals, superseded], []
        for path in stale:
            if path and path != target and path not in self.best_k_models and (
                    self._should_remove_checkpoint(trainer, path, target)):
                super()._remove_checkpoint(trainer, path)

    @override
    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        # A top-k checkpoint displaced at this step may be the one last.ckpt points to: keep it until the link
        # names the new newest file (_save_last_checkpoint runs right after the top-k save).
        if self.save_last and self.newest_path and os.path.abspath(filepath) == os.path.abspath(self.newest_path):
            self._deferred_removals.append(filepath)
            return
        super()._remove_checkpoint(trainer, filepath)

    def _point_link(self, trainer, link: str, target: str) -> bool:
        """Make ``link`` a relative symbolic link to ``target`` (rank zero; a temporary link renamed over it).
        False where symbolic links cannot be made."""
        made = True
        if trainer.is_global_zero:
            link_path = Path(link)
            temporary = link_path.with_name(f".{link_path.name}.link{os.getpid()}")
            temporary.unlink(missing_ok=True)
            try:
                os.symlink(os.path.relpath(target, link_path.parent), temporary)
                os.replace(temporary, link_path)
            except OSError:
                temporary.unlink(missing_ok=True)
                made = False
        made = trainer.strategy.broadcast(made)
        trainer.strategy.barrier("LinkedLastModelCheckpoint.link")
        return made
