"""One progress option for every long loop (generation, sweeps, training, MELBO).

    from .progress import Progress
    generate(model, prompts, GenerationConfig(64), progress=Progress(True, chunk=8))
    sweep_vectors(model, prompts, vectors, ..., config=SweepConfig(progress=False))

THE default, everywhere in the library: off (`DEFAULT`).  Library calls are silent and
compiled loops run uncut unless asked; the scripts turn bars on (and take --no-progress
where a run is long).  A function that reports progress takes `progress: bool | Progress`; `True` / `False` are
shorthands for `Progress(enabled=...)` with the function's own bar title.  `chunk` matters
only where a compiled loop must be cut into pieces for the bar to move (generation decodes
`chunk` steps between updates); elsewhere the bar advances once per natural unit of work
(a sweep chunk, a training step).  A disabled bar costs nothing: the loop runs uncut.
"""

from __future__ import annotations

import dataclasses

import numpy as np


DEFAULT = False  # every `progress=` argument of the library defaults to this


@dataclasses.dataclass(frozen=True)
class Progress:
    """Whether to show a tqdm bar, its title, and (compiled loops) the steps between updates.

    enabled: show the bar.
    desc:    the bar's title; None = the calling function's default ("generate", "sweep", ...).
    chunk:   steps per update of a loop that is compiled whole (generation); an int >= 1.
    """

    enabled: bool = False
    desc: str | None = None
    chunk: int = 16

    def __post_init__(self):
        if not isinstance(self.enabled, (bool, np.bool_)):
            raise TypeError(f"Progress.enabled must be a bool; got {self.enabled!r}")
        if self.desc is not None and not isinstance(self.desc, str):
            raise TypeError(f"Progress.desc must be a str or None; got {self.desc!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1:
            raise ValueError(f"Progress.chunk must be an int >= 1; got {self.chunk!r}")

    @classmethod
    def of(cls, value: bool | Progress | None) -> Progress:
        """`value` as a Progress: a Progress as is, a bool as `Progress(enabled=value)`, None as off."""
        if isinstance(value, Progress):
            return value
        if value is None:
            return cls()
        if isinstance(value, (bool, np.bool_)):
            return cls(enabled=bool(value))
        raise TypeError(f"progress must be a bool or a models.runtime.progress.Progress; got {value!r}")

    def titled(self, desc: str) -> Progress:
        """This option with `desc` as its title unless it already has one."""
        return self if self.desc is not None else dataclasses.replace(self, desc=desc)

    def bar(self, default_desc: str, **tqdm_kwargs):
        """A tqdm bar (disabled unless `enabled`), titled `desc` or else `default_desc`."""
        from tqdm.auto import tqdm

        return tqdm(disable=not self.enabled, desc=self.desc or default_desc, **tqdm_kwargs)
