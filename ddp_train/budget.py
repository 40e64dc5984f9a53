"""Where a run's wall-clock went, from process start to exit: a few perf_counter reads, no GPU syncs.

Phases are timed by `with budget.phase(name):` around the set-up and tear-down steps and by the epoch boundaries
the trainer already has (which sync anyway: the epoch's metrics are all-reduced). Warm-up is what the first epoch
(training and evaluation) took beyond a steady one: FFCV's JIT, cuDNN autotuning, the first allocations.
"""
import contextlib
import statistics
import time

import psutil

# Printed and logged in this order; anything not timed lands in "other".
PHASES = ("startup", "checks", "process_group", "run_dir", "model", "loaders", "tracking_start", "warmup",
          "training", "evaluation", "checkpoints", "export", "other")
LABELS = {"startup": "process start and imports", "checks": "config and data checks",
          "process_group": "process-group set-up", "run_dir": "run directory and resume",
          "model": "model build", "loaders": "loader construction", "tracking_start": "MLflow start",
          "warmup": "first-epoch warm-up (excess over a steady epoch)", "training": "steady training",
          "evaluation": "steady evaluation", "checkpoints": "checkpoints", "export": "export, reports, uploads",
          "other": "other"}


class Budget:
    def __init__(self):
        self.t0 = time.perf_counter()
        # The process started before Python ran this: its age is the start-up and import time.
        self.startup = max(0.0, time.time() - psutil.Process().create_time())
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["startup"] = self.startup
        self.train_epochs, self.eval_epochs = [], []

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t

    def epoch(self, train_s: float, eval_s: float) -> None:
        self.train_epochs.append(train_s)
        self.eval_epochs.append(eval_s)

    def elapsed(self) -> float:
        return self.startup + time.perf_counter() - self.t0

    def summary(self) -> dict:
        """Seconds per phase; they sum to the wall-clock since the process started (at this call: the table, the
        CSV and the metrics of one run take one summary, so that they agree)."""
        s = dict(self.seconds)
        for key, times in (("training", self.train_epochs), ("evaluation", self.eval_epochs)):
            steady = statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else 0.0)
            excess = max(0.0, times[0] - steady) if times else 0.0
            s["warmup"] += excess
            s[key] += sum(times) - excess
        s["other"] = max(0.0, self.elapsed() - sum(v for k, v in s.items() if k != "other"))
        return s

    def table(self, s: dict | None = None) -> str:
        s = s or self.summary()
        total = sum(s.values())
        rows = [f"  {LABELS[k]:<50s} {v:8.2f} s {100 * v / total:5.1f} %" for k, v in s.items() if v >= 0.005]
        return "\n".join([f"time budget ({total:.1f} s wall):", *rows])

    def csv(self, s: dict | None = None) -> str:
        s = s or self.summary()
        return "phase,seconds,description\n" + "".join(f"{k},{v:.3f},{LABELS[k]}\n" for k, v in s.items())

    def metrics(self, s: dict | None = None) -> dict:
        s = s or self.summary()
        return {**{f"time_{k}_s": v for k, v in s.items()}, "time_total_s": sum(s.values())}
