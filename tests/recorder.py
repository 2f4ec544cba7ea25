"""A Reporter for train_loop tests: keeps every epoch's report."""

from distcluster.engine.loop import EpochReport


class Recorder:
    def __init__(self) -> None:
        self.reports: list[EpochReport] = []
        self.saved: list[int | bool] = []  # the checkpoint's epoch where one was kept, else False

    def epoch_end(self, report: EpochReport) -> None:
        self.reports.append(report)
        self.saved.append(report.save and report.checkpoint is not None and report.checkpoint()["epoch"])

    @property
    def epochs(self) -> list[dict[str, float]]:
        """Every epoch's metrics."""
        return [r.metrics for r in self.reports]
