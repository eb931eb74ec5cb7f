"""RQ-VAE semantic IDs (TIGER, arXiv 2305.05065, section 3.1), the alternative to balanced RQ k-means.

Shape legend: N items, D input embedding dim, Z latent dim, K codebook size, L levels, B batch.

    x_BD --encoder MLP--> z_BZ --residual quantiser (L codebooks [K, Z])--> z_q_BZ --decoder MLP--> x_hat_BD

    r_0 = z;  c_l = argmin_k ||r_l - e_l[k]||;  r_{l+1} = r_l - e_l[c_l];  z_q = sum_l e_l[c_l]
    loss = ||x - x_hat||^2 + sum_l ( ||sg[r_l] - e_l[c_l]||^2 + beta * ||r_l - sg[e_l[c_l]]||^2 )

Gradients pass the quantiser straight through (z + sg[z_q - z]). Codebooks start from
k-means on the first level's residuals of the untrained encoder (TIGER), and a code that
no item used during the last `restart_every` epochs is restarted at a random current
residual of its level (codebook-collapse guard), so utilization stays high.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from onerec.config import RQVAEConfig
from onerec.logging import progress_disabled
from onerec.tokenizer.rq_kmeans import centroid_means, kmeans_plus_plus

log = logging.getLogger("onerec.tokenizer")


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def kmeans(x_ND: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++ seeding; returns centroids [k, D]."""
    centroids_KD = kmeans_plus_plus(x_ND, k, generator)
    for _ in range(iters):
        assign_N = torch.cdist(x_ND, centroids_KD).argmin(1)
        new_KD = centroid_means(x_ND, assign_N, k)
        empty_K = torch.bincount(assign_N, minlength=k) == 0
        centroids_KD = torch.where(empty_K.unsqueeze(1), centroids_KD, new_KD)
    return centroids_KD


class ResidualQuantizer(nn.Module):
    def __init__(self, levels: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebooks_LKZ = nn.Parameter(torch.randn(levels, codebook_size, dim) * dim**-0.5)

    def forward(self, z_BZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """(z_q with a straight-through gradient, codes [B, L], codebook loss, commitment loss, residual per level).

        Codebooks learn from the codebook loss only (VQ-VAE); the encoder from the
        reconstruction through the straight-through estimator and from the commitment loss.
        """
        residual = z_BZ
        quantized = torch.zeros_like(z_BZ)
        codes, residuals = [], []
        codebook_loss = z_BZ.new_zeros(())
        commit_loss = z_BZ.new_zeros(())
        for codebook_KZ in self.codebooks_LKZ:
            residuals.append(residual.detach())
            code_B = torch.cdist(residual.detach(), codebook_KZ.detach()).argmin(1)
            chosen_BZ = codebook_KZ[code_B]
            codebook_loss = codebook_loss + (residual.detach() - chosen_BZ).pow(2).sum(1).mean()
            commit_loss = commit_loss + (residual - chosen_BZ.detach()).pow(2).sum(1).mean()
            quantized = quantized + chosen_BZ
            residual = residual - chosen_BZ.detach()
            codes.append(code_B)
        z_q_BZ = z_BZ + (quantized - z_BZ).detach()
        return z_q_BZ, torch.stack(codes, 1), codebook_loss, commit_loss, residuals


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, levels: int, codebook_size: int, cfg: RQVAEConfig) -> None:
        super().__init__()
        dims = [input_dim, *cfg.hidden_dims, cfg.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.quantizer = ResidualQuantizer(levels, codebook_size, cfg.latent_dim)
        self.commitment = cfg.commitment

    def forward(self, x_BD: torch.Tensor) -> dict[str, torch.Tensor]:
        z_BZ = self.encoder(x_BD)
        z_q_BZ, codes_BL, codebook_loss, commit_loss, residuals = self.quantizer(z_BZ)
        recon = (self.decoder(z_q_BZ) - x_BD).pow(2).sum(1).mean()
        loss = recon + codebook_loss + self.commitment * commit_loss
        return {"loss": loss, "recon": recon, "codes_BL": codes_BL, "residuals": residuals}

    @torch.no_grad()
    def codes(self, x_ND: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        return torch.cat([self.forward(x_ND[s : s + batch_size])["codes_BL"] for s in range(0, len(x_ND), batch_size)])


def train_rq_vae(
    x_ND: torch.Tensor,
    levels: int,
    codebook_size: int,
    cfg: RQVAEConfig,
    seed: int,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, dict]:
    """Train an RQ-VAE on the item embeddings; returns (codes_NL int64 on CPU, training summary)."""
    if x_ND.dim() != 2 or not torch.isfinite(x_ND).all():
        raise ValueError(f"expected finite item vectors [N, D], got shape {tuple(x_ND.shape)}")
    N = x_ND.shape[0]
    if N < codebook_size:
        raise ValueError(f"{N} items are fewer than tokenizer.codebook_size={codebook_size}: lower it")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_ND = x_ND.detach().to(device=device, dtype=torch.float32)
    model = RQVAE(x_ND.shape[1], levels, codebook_size, cfg).to(device)

    with torch.no_grad():  # k-means initialisation, level by level, on the untrained encoder's output
        residual = model.encoder(x_ND)
        for level in range(levels):
            centroids = kmeans(residual, codebook_size, 10, generator)
            model.quantizer.codebooks_LKZ[level].copy_(centroids)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    used_LK = torch.zeros(levels, codebook_size, dtype=torch.bool, device=device)
    restarts = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="rq-vae", disable=progress_disabled(), dynamic_ncols=True)
    for epoch in bar:
        order = torch.randperm(N, generator=generator).to(device)
        for start in range(0, N, cfg.batch_size):
            out = model(x_ND[order[start : start + cfg.batch_size]])
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            for level in range(levels):
                used_LK[level, out["codes_BL"][:, level]] = True
        if cfg.restart_every and epoch % cfg.restart_every == 0 and epoch < cfg.epochs:
            restarts += _restart_dead_codes(model, x_ND, used_LK, generator)
            used_LK.zero_()
        bar.set_postfix(loss=f"{out['loss'].item():.4f}", recon=f"{out['recon'].item():.4f}")
    model.eval()
    codes_NL = model.codes(x_ND).cpu()
    with torch.no_grad():
        final = model(x_ND)
    summary = {"reconstruction_mse": float(final["recon"]), "dead_code_restarts": restarts, "epochs": cfg.epochs}
    log.info("rq-vae: reconstruction %.4f, %d dead-code restarts", summary["reconstruction_mse"], restarts)
    return codes_NL, summary


@torch.no_grad()
def _restart_dead_codes(model: RQVAE, x_ND: torch.Tensor, used_LK: torch.Tensor, generator: torch.Generator) -> int:
    """Move every code unused since the last check onto a random current residual of its level."""
    residuals = model(x_ND)["residuals"]
    restarted = 0
    for level, residual_NZ in enumerate(residuals):
        dead = torch.nonzero(~used_LK[level]).flatten()
        if dead.numel() == 0:
            continue
        picks = torch.randint(len(residual_NZ), (dead.numel(),), generator=generator).to(residual_NZ.device)
        model.quantizer.codebooks_LKZ[level, dead] = residual_NZ[picks]
        restarted += dead.numel()
    return restarted
