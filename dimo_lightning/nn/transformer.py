"""The MaskGIT-style bidirectional transformer (MaskGIT PyTorch v1.0 "MaskTransformer").

Module and parameter names follow the released checkpoint (valeoai/Maskgit-pytorch, tag v1.0) so that
``state_dict()`` of the ImageNet-256 configuration has exactly its 305 keys and 174,160,874 parameters.

Token layout of the shared embedding table (K = codebook size, C = number of classes):

    0 .. K-1           image codes
    K                  the mask token
    K+1 .. K+C         class tokens (class y has id K + 1 + y)
    K+1+C              the null ("dropped") class used for classifier-free guidance

The sequence is the N image tokens followed by one class token (last). The output head is tied to the token
table: ``logits = last_layer(h) @ tok_emb.weight.T + bias``, sliced to the N image positions and the K + 1 ids of
codes and mask. By default only those returned entries are computed (``full_head=False``): the class-token
position and the class/null columns are never scored, which gives the same logits with less work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run through SDPA.

    The parameters are ``in_proj_weight`` (3D, D) packed as q, k, v, ``in_proj_bias`` (3D,) and ``out_proj``
    (Linear D -> D), exactly what ``nn.MultiheadAttention(batch_first=True)`` stores, so released checkpoints load
    strictly. The forward calls ``F.scaled_dot_product_attention`` directly: the attention matrix is never
    materialised by our code and PyTorch picks its fused kernel (flash / memory-efficient) where available.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"hidden_dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        b, length, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        qkv = qkv.view(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, dim))


class Attention(nn.Module):
    """Holds the attention under the name ``mha`` (checkpoint keys ``...fn.mha.in_proj_weight``)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.mha = PackedSelfAttention(dim, heads, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x)


class FeedForward(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout, stored as ``net.{0,1,2,3,4}``."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """LayerNorm (``norm``) then the wrapped function (``fn``)."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class TransformerEncoder(nn.Module):
    """``layers.{i}.0`` attention and ``layers.{i}.1`` MLP, each pre-norm with a residual."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PreNorm(dim, Attention(dim, heads, dropout)), PreNorm(dim, FeedForward(dim, mlp_dim, dropout))]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x


class MaskTransformer(nn.Module):
    """Class-conditional bidirectional transformer over a grid of image tokens (MaskGIT v1.0 layout).

    Args:
        codebook_size: number of image codes K.
        num_classes: number of classes C.
        grid_size: tokens per side P; the sequence holds N = P * P image tokens.
        hidden_dim: width D.
        depth: number of transformer layers.
        heads: attention heads (the released MaskGIT weights use 16; heads cannot be read off the shapes).
        mlp_dim: hidden width of the MLP.
        dropout: dropout in the input/output layers, the attention and the MLP.
        full_head: compute the head over all N + 1 positions and all vocabulary ids before slicing, as the
            reference code does (a benchmark baseline); False computes only the N x (K + 1) returned logits. Either
            way the parameters and the state-dict layout are the same.
    """

    def __init__(
        self,
        codebook_size: int = 1024,
        num_classes: int = 1000,
        grid_size: int = 16,
        hidden_dim: int = 768,
        depth: int = 24,
        heads: int = 16,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        full_head: bool = False,
    ) -> None:
        super().__init__()
        for name, value in dict(
            codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size, hidden_dim=hidden_dim,
            depth=depth, heads=heads, mlp_dim=mlp_dim,
        ).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        # The constructor arguments: what an exported student's config.json needs to rebuild this network.
        self.config = dict(
            codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size, hidden_dim=hidden_dim,
            depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
        )
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.grid_size = grid_size
        self.hidden_dim = hidden_dim
        self.seq_len = grid_size * grid_size
        self.mask_id = codebook_size
        self.null_class_id = codebook_size + 1 + num_classes
        self.vocab_size = codebook_size + 1 + num_classes + 1  # codes, mask, classes, null class
        self.logit_width = codebook_size + 1  # codes + mask slot
        self.full_head = full_head  # a plain attribute: switchable after construction, not in the state dict

        self.tok_emb = nn.Embedding(self.vocab_size, hidden_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len + 1, hidden_dim))
        self.first_layer = nn.Sequential(
            nn.LayerNorm(hidden_dim, eps=1e-12),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.LayerNorm(hidden_dim, eps=1e-12),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
        )
        self.transformer = TransformerEncoder(hidden_dim, depth, heads, mlp_dim, dropout)
        self.last_layer = nn.Sequential(
            nn.LayerNorm(hidden_dim, eps=1e-12),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.LayerNorm(hidden_dim, eps=1e-12),
        )
        self.bias = nn.Parameter(torch.zeros(self.seq_len + 1, self.vocab_size))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        nn.init.trunc_normal_(self.tok_emb.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, PackedSelfAttention):
                nn.init.trunc_normal_(module.in_proj_weight, std=0.02)
                nn.init.zeros_(module.in_proj_bias)

    def code_embedding_rms(self) -> float:
        """Root mean square of the code rows of the token table (the scale of clean image-token embeddings)."""
        with torch.no_grad():
            rows = self.tok_emb.weight[: self.codebook_size].float()
            return float(rows.pow(2).mean().sqrt())

    def forward_features(
        self,
        image_embeddings: torch.Tensor,
        labels: torch.Tensor,
        drop_label: torch.Tensor | None = None,
        layers: tuple[int, ...] | list[int] = (),
    ) -> list[torch.Tensor]:
        """Hidden states of the trunk run on given image-token embeddings (the Soft-Di[M]O discriminator trunk).

        The same submodules as :meth:`forward` (class token from ``tok_emb``, ``pos_emb``, ``first_layer``, the
        transformer blocks), but the N image positions take ``image_embeddings`` instead of a table lookup, so
        soft (expected) embeddings and mask-augmented sequences go through, and gradients reach the embeddings.
        The blocks after the deepest requested layer are not run.

        Args:
            image_embeddings: (B, N, D) embeddings of the N image tokens (e.g. ``tok_emb(codes)``, or a soft
                embedding ``softmax(z) @ tok_emb.weight[:K]``).
            labels: (B,) class ids in [0, C).
            drop_label: (B,) bool; True uses the null class.
            layers: which hidden states to return: 0 is the output of ``first_layer`` (the transformer's input),
                l in [1, depth] the output of block l.

        Returns:
            One (B, N + 1, D) tensor per entry of ``layers``, in that order (the class position is last).
        """
        if image_embeddings.ndim != 3 or image_embeddings.shape[1:] != (self.seq_len, self.hidden_dim):
            raise ValueError(
                f"image_embeddings must have shape (B, {self.seq_len}, {self.hidden_dim}), got "
                f"{tuple(image_embeddings.shape)}"
            )
        depth = len(self.transformer.layers)
        bad = [layer for layer in layers if not 0 <= layer <= depth]
        if not layers or bad:
            raise ValueError(f"layers must be a non-empty list of indices in [0, {depth}], got {list(layers)}")
        class_ids = labels.long() + self.codebook_size + 1
        if drop_label is not None:
            class_ids = torch.where(drop_label, torch.full_like(class_ids, self.null_class_id), class_ids)
        class_emb = self.tok_emb(class_ids)[:, None].to(image_embeddings.dtype)
        x = torch.cat([image_embeddings, class_emb], dim=1) + self.pos_emb  # (B, N+1, D)
        states = {0: self.first_layer(x)}
        x = states[0]
        for index, (attn, ff) in enumerate(self.transformer.layers[: max(layers)], start=1):
            x = x + attn(x)
            x = x + ff(x)
            states[index] = x
        return [states[layer] for layer in layers]

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor,
        drop_label: torch.Tensor | None = None,
        emb_noise_sigma: float | torch.Tensor = 0.0,
        emb_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits over codes and the mask slot.

        Args:
            codes: (B, N) or (B, P, P) token ids in [0, K] (K is the mask id).
            labels: (B,) class ids in [0, C).
            drop_label: (B,) bool; True replaces the class with the null class (unconditional branch of CFG).
            emb_noise_sigma: sigma of the variance-preserving embedding perturbation
                ``e' = sigma * scale * eps + sqrt(1 - sigma^2) * e`` applied to the N image-token embeddings
                before the positional embedding (Di[M]O student input); scalar or (B,).
            emb_noise_scale: multiplies eps; 1 is the paper's absolute form, the code-embedding RMS gives noise
                relative to the embeddings' scale.
            generator: random source for eps.

        Returns:
            (B, N, K + 1) logits.
        """
        b = codes.shape[0]
        codes = codes.reshape(b, -1)
        if codes.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} tokens per sample, got {codes.shape[1]}")
        class_ids = labels.long() + self.codebook_size + 1
        if drop_label is not None:
            class_ids = torch.where(drop_label, torch.full_like(class_ids, self.null_class_id), class_ids)
        image_emb = self.tok_emb(codes)  # (B, N, D)
        # A number 0 skips the noise (decided on the host); a tensor sigma always draws it (rows with sigma 0 keep
        # their embedding exactly), so no device value is read back.
        if torch.is_tensor(emb_noise_sigma) or emb_noise_sigma != 0:
            sigma = torch.as_tensor(emb_noise_sigma, dtype=image_emb.dtype, device=image_emb.device)
            sigma = sigma.reshape(-1, 1, 1) if sigma.ndim else sigma
            eps = torch.randn(image_emb.shape, generator=generator, device=image_emb.device, dtype=image_emb.dtype)
            image_emb = sigma * emb_noise_scale * eps + torch.sqrt(1 - sigma * sigma) * image_emb
        x = torch.cat([image_emb, self.tok_emb(class_ids)[:, None]], dim=1) + self.pos_emb  # (B, N+1, D)
        x = self.first_layer(x)
        x = self.transformer(x)
        x = self.last_layer(x)
        return self.output_head(x)

    def output_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head: hidden states (B, N+1, D) -> logits (B, N, K + 1) over codes and the mask slot."""
        if self.full_head:
            logits = hidden @ self.tok_emb.weight.T + self.bias  # (B, N+1, vocab): the reference computation
            return logits[:, : self.seq_len, : self.logit_width]
        # Only the N image positions and the K + 1 code/mask rows of the tied table: one fused matmul + bias.
        n, v = self.seq_len, self.logit_width
        return F.linear(hidden[:, :n], self.tok_emb.weight[:v], self.bias[:n, :v])  # (B, N, K+1); bias broadcasts


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(math.prod(p.shape) for p in module.parameters())
