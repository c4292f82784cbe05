from models.loading import CheckpointLoadError, load_encoder
from models.resnet_simclr import Encoder, ProjectionHead, ResNetSimCLR, create_model

__all__ = ["CheckpointLoadError", "Encoder", "ProjectionHead", "ResNetSimCLR", "create_model", "load_encoder"]
