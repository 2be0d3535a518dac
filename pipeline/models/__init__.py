"""Networks, and how they are conditioned and sampled; nothing about training.

`<family>.py` holds one family's networks and their config dataclass. Every generator exposes `z_dim`,
`img_resolution`, `img_channels` and `forward(z, c) -> images in [-1, 1]`; every discriminator `forward(img, c)
-> logits`. `conditioning` turns batches and requests into `c`; `sampling` (and `stylegan_sampling` for
style-based generators) turns seeds into images. Families are assembled in `pipeline.families`.
"""
