"""A reference PyTorch VQGAN with taming-transformers' module layout and forward pass (the layout
Chameleon's released image tokenizer uses), written for the interop tests."""

import torch
from torch import nn
from torch.nn import functional as F


def normalize(channels, groups):
  return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x):
  return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
  def __init__(self, in_channels, out_channels, groups):
    super().__init__()
    self.norm1 = normalize(in_channels, groups)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
    self.norm2 = normalize(out_channels, groups)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
    if in_channels != out_channels:
      self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

  def forward(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    if hasattr(self, "nin_shortcut"):
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  def __init__(self, channels, groups):
    super().__init__()
    self.norm = normalize(channels, groups)
    self.q = nn.Conv2d(channels, channels, 1)
    self.k = nn.Conv2d(channels, channels, 1)
    self.v = nn.Conv2d(channels, channels, 1)
    self.proj_out = nn.Conv2d(channels, channels, 1)

  def forward(self, x):
    h = self.norm(x)
    q, k, v = self.q(h), self.k(h), self.v(h)
    b, c, hh, ww = q.shape
    q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
    k = k.reshape(b, c, hh * ww)
    w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = v.reshape(b, c, hh * ww)
    h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + self.proj_out(h)


class Downsample(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
               z_channels, groups):
    super().__init__()
    self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
    in_ch_mult = (1,) + tuple(ch_mult)
    self.down = nn.ModuleList()
    res = resolution
    for i, mult in enumerate(ch_mult):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      block_in, block_out = ch * in_ch_mult[i], ch * mult
      for _ in range(num_res_blocks):
        level.block.append(ResnetBlock(block_in, block_out, groups))
        block_in = block_out
        if res in attn_resolutions:
          level.attn.append(AttnBlock(block_in, groups))
      if i != len(ch_mult) - 1:
        level.downsample = Downsample(block_in)
        res //= 2
      self.down.append(level)
    self.mid = nn.Module()
    self.mid.block_1 = ResnetBlock(block_in, block_in, groups)
    self.mid.attn_1 = AttnBlock(block_in, groups)
    self.mid.block_2 = ResnetBlock(block_in, block_in, groups)
    self.norm_out = normalize(block_in, groups)
    self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for level in self.down:
      for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
          h = level.attn[i](h)
      if hasattr(level, "downsample"):
        h = level.downsample(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
  def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
               groups):
    super().__init__()
    block_in = ch * ch_mult[-1]
    res = resolution // 2 ** (len(ch_mult) - 1)
    self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
    self.mid = nn.Module()
    self.mid.block_1 = ResnetBlock(block_in, block_in, groups)
    self.mid.attn_1 = AttnBlock(block_in, groups)
    self.mid.block_2 = ResnetBlock(block_in, block_in, groups)
    self.up = nn.ModuleList()
    for i in reversed(range(len(ch_mult))):
      level = nn.Module()
      level.block, level.attn = nn.ModuleList(), nn.ModuleList()
      block_out = ch * ch_mult[i]
      for _ in range(num_res_blocks + 1):
        level.block.append(ResnetBlock(block_in, block_out, groups))
        block_in = block_out
        if res in attn_resolutions:
          level.attn.append(AttnBlock(block_in, groups))
      if i != 0:
        level.upsample = Upsample(block_in)
        res *= 2
      self.up.insert(0, level)
    self.norm_out = normalize(block_in, groups)
    self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

  def forward(self, z):
    h = self.conv_in(z)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
    for i in reversed(range(len(self.up))):
      level = self.up[i]
      for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
          h = level.attn[j](h)
      if hasattr(level, "upsample"):
        h = level.upsample(h)
    return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
  def __init__(self, n_embed, embed_dim):
    super().__init__()
    self.embedding = nn.Embedding(n_embed, embed_dim)
    self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

  def forward(self, z):
    z = z.permute(0, 2, 3, 1).contiguous()
    flat = z.view(-1, z.shape[-1])
    d = (flat.pow(2).sum(1, keepdim=True) + self.embedding.weight.pow(2).sum(1)
         - 2 * flat @ self.embedding.weight.t())
    codes = torch.argmin(d, dim=1)
    zq = self.embedding(codes).view(z.shape).permute(0, 3, 1, 2).contiguous()
    return zq, codes.view(z.shape[0], -1)


class VQModel(nn.Module):
  """taming.models.vqgan.VQModel without the loss module."""

  def __init__(self, cfg):
    super().__init__()
    dd = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions, resolution=cfg.resolution,
              z_channels=cfg.z_channels, groups=cfg.norm_groups)
    self.encoder = Encoder(in_channels=cfg.in_channels, **dd)
    self.decoder = Decoder(out_ch=cfg.in_channels, **dd)
    self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
    self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

  def encode(self, x):
    return self.quantize(self.quant_conv(self.encoder(x)))[1]

  def decode_code(self, codes, side):
    zq = self.quantize.embedding(codes).view(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return self.decoder(self.post_quant_conv(zq))
