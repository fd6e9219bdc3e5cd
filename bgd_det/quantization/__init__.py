"""Product quantization: EM, codebook layers, plan, size accounting."""
from .layers import PQ_LAYER_TYPES, PQConv2d, PQConvTranspose2d, PQLinear  # noqa: F401
from .plan import LayerPlan, QuantRules, build_plan, execution_order  # noqa: F401
from .pq import PQResult, em_quantize, pq_decode  # noqa: F401
from .size import SizeReport, model_size  # noqa: F401
