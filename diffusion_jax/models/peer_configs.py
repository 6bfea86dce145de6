"""The DDPM networks as the peer libraries configure them; no imports, so a PyTorch process can read it
alone."""

# google/ddpm-cifar10-32's config.json: the DDPM CIFAR-10 network as a diffusers UNet2DModel
DIFFUSERS_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6, norm_num_groups=32, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
    attention_head_dim=None, act_fn="silu", time_embedding_type="positional",
)
