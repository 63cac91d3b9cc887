"""What every command receives: the global options and the lazily loaded settings.

Owns: :class:`CliState` (the ``--config``/``--home``/``--setting`` flags) and loading the
platform settings from them only when a command needs them, so ``--help`` never
touches a config file. Does not own: the settings model (``loraplex.config``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import click

from loraplex.config import LoraplexConfig, load_settings


@dataclass
class CliState:
    config_file: str | None = None
    home: str | None = None
    settings_overrides: list[str] = field(default_factory=list)
    _settings: LoraplexConfig | None = None

    def settings(self) -> LoraplexConfig:
        if self._settings is None:
            overrides = list(self.settings_overrides)
            if self.home is not None:
                overrides.insert(0, f"home={self.home}")
            self._settings = load_settings(self.config_file, overrides)
            # `log_level` (setting or LORAPLEX_LOG_LEVEL) sets how much loraplex says
            logging.getLogger("loraplex").setLevel(self._settings.log_level)
        return self._settings


pass_state = click.make_pass_decorator(CliState, ensure=True)
