"""DDPM at 256x256: CelebA-HQ and LSUN church, bedroom, cat (the original run_celebahq.py, run_lsun.py).

    python train.py --config=configs/ddpm256.py:DATASET --workdir=DIR --distributed

DATASET: celeb_a_hq, lsun_church, lsun_bedroom, lsun_cat. Network unet2d16b2c112244
(113,673,219 parameters; ch_mult 1, 1, 2, 2, 4, 4, attention at 16x16), dropout 0, Adam 2e-5
with 5,000 warmup steps, batch 64, EMA 0.9999, random flips (not for LSUN cat).

Data (tfds): 'celeb_a_hq/256' needs a manual download (see the tfds catalog page of
celeb_a_hq: the images are built from CelebA with the Progressive GAN scripts, then placed
in ~/tensorflow_datasets/downloads/manual/); 'lsun/church_outdoor', 'lsun/bedroom' and
'lsun/cat' download from the LSUN site. Images are center-cropped and resized to 256x256.
Read by name, each process holds its share of the split in host memory (about 196 KB per
image): fine for CelebA-HQ (30k) and LSUN church (126k). For LSUN bedroom (3M, ~600 GB as
uint8) prepare the records once and stream them, with flat host memory:
    python -m diffusion_jax.prepare_data --source=tfds:lsun/bedroom --image_size=256 --out=gs://B/bedroom256
    python train.py --config=configs/ddpm256.py:lsun_bedroom --config.data.name=prepared:gs://B/bedroom256 ...

Hardware and time: the paper trained on TPU v3-128 pods; reported FID: LSUN church 7.89,
bedroom 4.90 (6.36 in the table's large model run), CelebA-HQ no FID (samples only).
"""

from diffusion_jax import config as config_lib


def get_config(dataset="lsun_church"):
    c = config_lib.base()
    c.data.update(name=dataset, image_size=256, channels=3, randflip=dataset != "lsun_cat")
    c.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
    c.optim.update(lr=2e-5)
    c.train.update(batch_size=64, num_steps=2_400_000, keep_period=100_000)
    c.sample.update(num=16)
    return c
