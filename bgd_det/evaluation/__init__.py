from .classification import ClassificationEvaluator  # noqa: F401
from .evaluator import DatasetEvaluator, PairedEvaluator, inference_on_dataset  # noqa: F401
