"""Models: VAE and CVAE (MLP or convolutional) and PPCA, all with one encoder/decoder contract.

    encoder(x[, y]) -> mu, logvar            q(z|x[,y]) = N(mu, diag exp(logvar))
    decoder(z[, y]) -> parameters of p(x|z[,y]): (x_mean, x_logvar) Gaussian, (x_logits,) Bernoulli

x is a batch of flattened, normalised rows [batch, features]; y is one-hot [batch, classes]. The
encoder and decoder are separate modules because each becomes its own ONNX graph. Pure: no I/O.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vaeserve.scoring import LIKELIHOODS, decoder_outputs

KINDS = ("vae", "cvae", "ppca")
ARCHS = ("mlp", "conv")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in the checkpoint's config.json."""

    input_dim: int  # features per row (pixels for images)
    kind: str = "vae"  # vae | cvae | ppca
    arch: str = "mlp"  # mlp | conv (conv needs image_shape with height and width divisible by 4)
    image_shape: tuple[int, int, int] | None = None  # (channels, height, width) of image rows
    latent_dim: int = 8
    hidden: tuple[int, ...] = (256, 128)  # MLP layer widths; conv uses channel counts (32, 64)
    num_classes: int = 0  # CVAE label classes
    likelihood: str = "bernoulli"  # gaussian (learned per-feature variance) | gaussian-fixed | bernoulli
    fixed_logvar: float = 0.0  # gaussian-fixed: log sigma^2 of every feature
    min_logvar: float = -6.0  # floor on learned log-variances, so a feature constant in training stays finite

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHS}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; expected one of {LIKELIHOODS}")
        if self.kind == "cvae" and self.num_classes < 2:
            raise ValueError("a CVAE needs at least 2 label classes")
        if self.arch == "conv":
            if self.image_shape is None:
                raise ValueError("the convolutional architecture needs image data")
            _, h, w = self.image_shape
            if h % 4 or w % 4:
                raise ValueError(f"the convolutional architecture needs height and width divisible by 4, got {h}x{w}")

    @property
    def conditional(self) -> bool:
        return self.kind == "cvae"

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(config: ModelConfig) -> nn.Module:
    if config.kind == "ppca":
        return PPCA(config)
    return VAE(config)


class VAE(nn.Module):
    """VAE or CVAE (Kingma & Welling 2014; Sohn et al. 2015)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        conv = config.arch == "conv"
        self.encoder = ConvEncoder(config) if conv else MLPEncoder(config)
        self.decoder = ConvDecoder(config) if conv else MLPDecoder(config)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def _with_label(h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return h if y is None else torch.cat([h, y], dim=1)


class MLPEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.body = _mlp([config.input_dim + config.num_classes, *config.hidden])
        self.head = nn.Linear(config.hidden[-1], 2 * config.latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(_with_label(x, y))).chunk(2, dim=1)
        return mu, logvar


class LikelihoodHead(nn.Module):
    """Turns the decoder's last layer into the parameters of p(x|z)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.likelihood = config.likelihood
        self.min_logvar = config.min_logvar
        if config.likelihood == "gaussian":
            self.logvar = nn.Parameter(torch.zeros(config.input_dim))
        else:
            self.register_buffer("logvar", torch.full((config.input_dim,), float(config.fixed_logvar)))

    def forward(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.likelihood == "bernoulli":
            return (out,)
        logvar = torch.clamp(self.logvar, min=self.min_logvar).expand_as(out)
        return out, logvar


class MLPDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = list(reversed(config.hidden))
        self.body = nn.Sequential(_mlp([config.latent_dim + config.num_classes, *widths]), nn.Linear(widths[-1], config.input_dim))
        self.head = LikelihoodHead(config)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return self.head(self.body(_with_label(z, y)))


CONV_CHANNELS = (32, 64)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (H, W -> H/4, W/4), then a linear layer to mu and logvar."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, h, w = config.image_shape
        self.image_shape = config.image_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, CONV_CHANNELS[0], 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(CONV_CHANNELS[0], CONV_CHANNELS[1], 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        flat = CONV_CHANNELS[1] * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Linear(flat + config.num_classes, config.hidden[-1]), nn.ReLU(), nn.Linear(config.hidden[-1], 2 * config.latent_dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.reshape(-1, *self.image_shape))
        mu, logvar = self.head(_with_label(h, y)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, h, w = config.image_shape
        self.grid = (CONV_CHANNELS[1], h // 4, w // 4)
        self.body = nn.Sequential(
            nn.Linear(config.latent_dim + config.num_classes, config.hidden[-1]), nn.ReLU(),
            nn.Linear(config.hidden[-1], math.prod(self.grid)), nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(CONV_CHANNELS[1], CONV_CHANNELS[0], 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(CONV_CHANNELS[0], c, 4, stride=2, padding=1),
            nn.Flatten(),
        )
        self.head = LikelihoodHead(config)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        h = self.body(_with_label(z, y)).reshape(-1, *self.grid)
        return self.head(self.deconv(h))


class PPCA(nn.Module):
    """Probabilistic PCA (Tipping & Bishop 1999) behind the VAE contract.

    p(z) = N(0, I), p(x|z) = N(W z + m, s^2 I). With the maximum-likelihood W = U (L - s^2 I)^(1/2),
    M = W^T W + s^2 I is diagonal, so the exact posterior N(M^-1 W^T (x - m), s^2 M^-1) is a diagonal
    Gaussian: the encoder returns it exactly and the importance-weighted bound equals log p(x).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, q = config.input_dim, config.latent_dim
        self.config = config
        self.encoder = PPCAEncoder(d, q)
        self.decoder = PPCADecoder(d, q)

    @torch.no_grad()
    def fit(self, x: np.ndarray) -> None:
        """Closed-form maximum-likelihood fit on rows x [n, d] (Tipping & Bishop 1999, eqs. 7-8)."""
        x = np.asarray(x, np.float64)
        d, q = self.config.input_dim, self.config.latent_dim
        if q >= d:
            raise ValueError(f"PPCA needs a latent size below the feature count ({d}), got {q}")
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False, bias=True)
        eigvals, eigvecs = np.linalg.eigh(cov)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = np.maximum(eigvals[order], 0.0), eigvecs[:, order]
        noise_var = max(eigvals[q:].mean(), 1e-6)
        weight = eigvecs[:, :q] * np.sqrt(np.maximum(eigvals[:q] - noise_var, 0.0))
        m_diag = (weight**2).sum(axis=0) + noise_var  # M = W^T W + s^2 I is diagonal here
        self.set_parameters(mean, weight, noise_var, m_diag)

    def set_parameters(self, mean, weight, noise_var, m_diag):
        enc, dec = self.encoder, self.decoder
        enc.mean.copy_(torch.as_tensor(mean))
        enc.projection.copy_(torch.as_tensor(weight / m_diag))  # columns of W M^-1
        enc.logvar.copy_(torch.as_tensor(np.log(noise_var / m_diag)))
        dec.mean.copy_(torch.as_tensor(mean))
        dec.weight.copy_(torch.as_tensor(weight))
        dec.logvar.fill_(float(np.log(noise_var)))

    def covariance(self) -> np.ndarray:
        """W W^T + s^2 I, the model's covariance of x."""
        w = self.decoder.weight.double().numpy()
        return w @ w.T + math.exp(self.decoder.logvar.item()) * np.eye(w.shape[0])


class PPCAEncoder(nn.Module):
    def __init__(self, d: int, q: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("projection", torch.zeros(d, q))
        self.register_buffer("logvar", torch.zeros(q))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu = (x - self.mean) @ self.projection
        return mu, self.logvar.expand_as(mu)


class PPCADecoder(nn.Module):
    def __init__(self, d: int, q: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("weight", torch.zeros(d, q))
        self.register_buffer("logvar", torch.zeros(()))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x_mean = z @ self.weight.T + self.mean
        return x_mean, self.logvar.expand_as(x_mean)


def decode_params(model: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The decoder's outputs by name (see scoring.decoder_outputs)."""
    return dict(zip(decoder_outputs(model.config.likelihood), model.decoder(z, y)))


def feature_log_likelihood(x: torch.Tensor, params: dict[str, torch.Tensor], likelihood: str) -> torch.Tensor:
    """log p(x_d|z) per feature; the torch twin of scoring.feature_log_likelihood, for gradients."""
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(params["x_logits"], x, reduction="none")
    mean, logvar = params["x_mean"], params["x_logvar"]
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def elbo_loss(model: VAE, x: torch.Tensor, y: torch.Tensor | None, beta: float = 1.0, free_bits: float = 0.0) -> dict[str, torch.Tensor]:
    """The training objective for one batch, with its terms (batch means, nats).

    loss = reconstruction + beta * sum_d max(KL_d, free_bits), KL_d averaged over the batch
    (free bits: Kingma et al. 2016, eq. 15). beta < 1 early on is the KL warm-up.
    """
    mu, logvar = model.encoder(x, y)
    z = model.reparameterize(mu, logvar)
    reconstruction = -feature_log_likelihood(x, decode_params(model, z, y), model.config.likelihood).sum(dim=1).mean()
    kl_per_dim = (0.5 * (mu**2 + logvar.exp() - logvar - 1.0)).mean(dim=0)
    kl = kl_per_dim.sum()
    loss = reconstruction + beta * torch.clamp(kl_per_dim, min=free_bits).sum()
    return {"loss": loss, "neg_elbo": reconstruction + kl, "reconstruction": reconstruction, "kl": kl}


def active_units(mu: np.ndarray, threshold: float = 0.01) -> int:
    """Latent units whose posterior mean varies across data: Cov_x(E_q[z_u]) > 0.01 (Burda et al. 2016)."""
    return int((np.var(mu, axis=0) > threshold).sum())
