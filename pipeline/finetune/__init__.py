"""Stage: fine-tune the whole network end to end (LP-FT). ``finetune(cfg) -> FinetuneSummary``."""

from .stage import FinetuneSummary, finetune

__all__ = ["FinetuneSummary", "finetune"]
