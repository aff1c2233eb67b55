"""MSBReg pretraining: K-view BYOL-style training producing ResNet checkpoints."""
