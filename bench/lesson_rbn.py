"""The 2019 lesson's RunningBatchNorm as course-v3 last publishes it ("Simplified RunningBatchNorm" in
nbs/dl2/07_batchnorm.ipynb), the benchmark's reference for "never slower than the lesson's". The same code as
`LessonRunningBatchNorm` in nbs/07_batchnorm.ipynb."""
import math
import torch
from torch import nn


class LessonRunningBatchNorm(nn.Module):
    "The lesson's RunningBatchNorm: factor and offset computed once per training step; the items seen counted in Python."
    def __init__(self, nf, mom=0.1, eps=1e-5):
        super().__init__()
        self.mom, self.eps = mom, eps
        self.mults, self.adds = nn.Parameter(torch.ones(nf, 1, 1)), nn.Parameter(torch.zeros(nf, 1, 1))
        self.register_buffer('sums', torch.zeros(1, nf, 1, 1)); self.register_buffer('sqrs', torch.zeros(1, nf, 1, 1))
        self.register_buffer('count', torch.tensor(0.)); self.register_buffer('factor', torch.tensor(0.))
        self.register_buffer('offset', torch.tensor(0.))
        self.batch = 0

    def update_stats(self, x):
        bs, nc, *_ = x.shape
        self.sums.detach_(); self.sqrs.detach_()
        dims = (0, 2, 3)
        s, ss = x.sum(dims, keepdim=True), (x * x).sum(dims, keepdim=True)
        c = s.new_tensor(x.numel() / nc)
        mom1 = s.new_tensor(1 - (1 - self.mom) / math.sqrt(bs - 1))
        self.sums.lerp_(s, mom1); self.sqrs.lerp_(ss, mom1); self.count.lerp_(c, mom1)
        self.batch += bs
        means = self.sums / self.count
        varns = (self.sqrs / self.count).sub_(means * means)
        if bool(self.batch < 20): varns.clamp_min_(0.01)
        self.factor = self.mults / (varns + self.eps).sqrt()
        self.offset = self.adds - means * self.factor

    def forward(self, x):
        if self.training: self.update_stats(x)
        return x * self.factor + self.offset
