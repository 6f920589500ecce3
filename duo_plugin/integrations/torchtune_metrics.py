"""A torchtune metric logger that always writes to disk and also to TensorBoard when it is installed.

``DuoMetricLogger`` is a ``torchtune.training.metric_logging.MetricLoggerInterface``: recipes instantiate it from
``metric_logger: {_component_: duo_plugin.integrations.torchtune_metrics.DuoMetricLogger, log_dir: ...}`` and call
``log_dict(metrics, step)`` as with any torchtune logger.  Every record also gets ``wall_s`` (seconds since the
logger was created, i.e. since the run started) so that ``duo_plugin.plots`` can draw curves against wall time.

* disk: torchtune's ``DiskLogger`` (``log_dir/log_<unix time>.txt``, lines ``Step N | key:value ...``);
* TensorBoard: torchtune's ``TensorBoardLogger`` in ``log_dir/tensorboard`` when ``tensorboard`` imports
  (``tensorboard: auto``, the default), always (``true``: a clear error if it is missing) or never (``false``).
  ``pip install 'duo-plugin[tensorboard]'`` then ``tensorboard --logdir <output_dir>/logs``.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from torchtune.training.metric_logging import DiskLogger, MetricLoggerInterface

__all__ = ["DuoMetricLogger", "tensorboard_available"]


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class DuoMetricLogger(MetricLoggerInterface):
    def __init__(self, log_dir: str, filename: Optional[str] = None, tensorboard: Union[bool, str] = "auto",
                 wall_time: bool = True, **kwargs):
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"metric_logger.tensorboard must be true, false or auto; got {tensorboard!r}")
        self._t0 = time.perf_counter()
        self.wall_time = bool(wall_time)
        self.disk = DiskLogger(log_dir=log_dir, filename=filename)
        self.tensorboard = None
        if tensorboard is True and not tensorboard_available():
            raise ImportError("metric_logger.tensorboard=true needs the tensorboard package: "
                              "pip install 'duo-plugin[tensorboard]' (or set metric_logger.tensorboard=auto)")
        if tensorboard is True or (tensorboard == "auto" and tensorboard_available()):
            from torchtune.training.metric_logging import TensorBoardLogger

            self.tensorboard = TensorBoardLogger(log_dir=str(Path(log_dir) / "tensorboard"))

    def path_to_log_file(self) -> Path:
        return self.disk.path_to_log_file()

    def _loggers(self):
        return [lg for lg in (self.disk, self.tensorboard) if lg is not None]

    def log(self, name: str, data, step: int) -> None:
        for lg in self._loggers():
            lg.log(name, data, step)

    def log_config(self, config) -> None:
        self.disk.log_config(config)

    def log_dict(self, payload: Mapping, step: int) -> None:
        payload = dict(payload)
        if self.wall_time and "wall_s" not in payload:
            payload["wall_s"] = round(time.perf_counter() - self._t0, 3)
        for lg in self._loggers():
            lg.log_dict(payload, step)

    def close(self) -> None:
        for lg in self._loggers():
            lg.close()
