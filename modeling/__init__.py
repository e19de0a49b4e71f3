from .checkpoint import (CheckpointMismatchError, load_dit_checkpoint, load_pretrained, load_vavae_checkpoint,
                         save_pretrained)
from .flow import flow_loss, sample_time
from .lightningdit import LIGHTNINGDIT_SIZES, LightningDiT, build_lightningdit
from .sampling import sample, time_grid, timestep_shift
from .vavae import VAVAE_F16D32, AutoencoderKL, DiagonalGaussian, VAVAEModelConfig
from .vf_loss import adaptive_vf_weight, make_linear_proj, vf_loss
