"""Checkpoints: the compressed file format (:mod:`.format`), the peers' formats read into bgd_det's terms
(:mod:`.peers`), and the one loader that builds training or inference models from any of them (:mod:`.loader`)."""
from .format import (FORMAT, FORMATS, VERSION, check_compressed, check_finite, compressed_state,  # noqa: F401
                     detect_format, file_sha256, read_compressed, round_codebooks_to_fp16, save_compressed)
from .loader import (check_checkpoint_arch, checkpoint_cfg, compressed_model, convert_checkpoint, import_bgd, import_peer,  # noqa: F401
                     import_pqf, load_checkpoint_model, load_compressed, load_compressed_into)
from .peers import PEER_FORMATS, dense_state_dict, verify_model  # noqa: F401
