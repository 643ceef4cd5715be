"""Paged K/V memory for the serving engine: memory taken by what each request really has.

- Self-attention K/V live in pages of PAGE_TOKENS tokens: per self-attention layer one pool [pages, kv_heads,
  PAGE_TOKENS, head_dim]. A request holds the pages its prompt and its max_tokens need (taken at admission, so a
  running request never runs out: admission never over-commits, nothing is preempted).
- Cross-attention K/V live in pages of one image tile each (1,601 vision tokens): per cross-attention layer one
  pool [tiles, kv_heads, 1601, head_dim]. A request holds one page per real tile of its images (a 1-tile image
  takes one, a 4-tile image four), not max_images x max_tiles.
- An image's tile pages are kept after its request ends, keyed by its pixels (`ImageCache`): a later request with
  the same image (a chat client re-sending the conversation) reuses them and skips the vision encoder. Cached
  pages nobody uses are given back, least recently used first, when a new request needs pages.
- K/V are stored in the model's dtype, or with kv_cache_dtype="fp8" in e4m3 with a float32 scale per token and kv
  head (quantization.quantize_rows over head_dim): half the bytes and 3% for the scales. The decode step reads
  them through the same kernel (engine.paged_attention); a prefill attends over its own K/V in the model's dtype,
  and a prefill that reuses a cached image reads its tiles back dequantized.
- Page 0 of each pool is never handed out: free decode rows (those between busy ones in a step) write and read
  there, so they can never touch a request's pages.

`PagedCaches` also holds the per-slot page tables the decode step reads, and gives the model's layers the cache
views they attend through (`PagedKV.attend`, `PagedCrossKV.cross_attend`; see modeling/cache.py for the protocol).
The page bookkeeping (`PageAllocator`, `ImageCache`) is plain Python: no torch.
"""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field

import torch

from ..modeling.cache import kv_bytes_per_token
from ..quantization import FP8, quantize_rows
from .paged_attention import paged_decode_attention, write_pages
from .requests import RequestTooLong

PAGE_TOKENS = 64
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: the model's dtype


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported: use 'auto' (the model's dtype) or "
                         f"'fp8' (e4m3 with a scale per token and kv head)")


def _pools(layers: list[int], shape: tuple, dtype, device, fp8: bool) -> tuple[dict, dict, dict, dict]:
    """K and V pools of `shape` for each layer (and their scales [shape[:-1]] for FP8), a tensor each."""
    def make(shape, dtype):
        return {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
    if not fp8:
        return make(shape, dtype), make(shape, dtype), {}, {}
    return make(shape, FP8), make(shape, FP8), make(shape[:-1], torch.float32), make(shape[:-1], torch.float32)


def _store(pool: torch.Tensor, scales: torch.Tensor | None, index: torch.Tensor, part: torch.Tensor) -> None:
    """pool[index] = part, quantized per token and head (its scales into `scales`) when the pool is FP8; FP8 as
    bytes (torch has no index_copy_ for float8 types)."""
    if scales is None:
        pool.index_copy_(0, index, part)
        return
    values, scale = quantize_rows(part)
    pool.view(torch.uint8).index_copy_(0, index, values.view(torch.uint8))
    scales.index_copy_(0, index, scale[..., 0])


def _read(pool: torch.Tensor, scales: torch.Tensor | None, dtype) -> torch.Tensor:
    """Pool entries back in `dtype`, dequantized if stored in FP8."""
    return pool.to(dtype) if scales is None else (pool.float() * scales[..., None]).to(dtype)


def _pages(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """pool[index]; FP8 through bytes (no index_select for float8 types either)."""
    if pool.dtype == FP8:
        return pool.view(torch.uint8).index_select(0, index).view(FP8)
    return pool.index_select(0, index)


class OutOfPages(Exception):
    """The pool has fewer free pages than asked for."""



class PageAllocator:
    """Free page ids of one pool (ids 1..pages-1; 0 is the scratch page)."""

    def __init__(self, pages: int):
        if pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is scratch), got {pages}")
        self.total = pages - 1
        self.free_ids = list(range(pages - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self.free_ids)

    def take(self, count: int) -> list[int]:
        if count > len(self.free_ids):
            raise OutOfPages(f"{count} pages asked for, {len(self.free_ids)} free")
        taken = self.free_ids[len(self.free_ids) - count:]
        del self.free_ids[len(self.free_ids) - count:]
        return taken[::-1]

    def give(self, ids) -> None:
        self.free_ids.extend(ids)


def image_key(pixels: torch.Tensor, aspect_ratio_id: int, tiles: int) -> str:
    """What identifies an image's vision tokens: its tiles' pixels after the processor, and its tiling."""
    digest = hashlib.sha256()  # (the fastest strong digest on x86 with SHA extensions: 2x blake2b, measured)
    digest.update(f"{tuple(pixels.shape)}|{pixels.dtype}|{aspect_ratio_id}|{tiles}".encode())
    digest.update(memoryview(pixels.detach().cpu().contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


@dataclass
class CachedImage:
    pages: list[int]  # one tile page per tile, in tile order
    users: int = 0  # requests holding it
    ready: bool = False  # its pages hold the image's K/V (written by the prefill that encoded it)


class ImageCache:
    """Tile pages of recent images, by image_key. An entry in use (users > 0) is never evicted; unused ones go
    least recently used first when `reclaim` is asked for pages. Counts hits and misses for /metrics."""

    def __init__(self, allocator: PageAllocator, enabled: bool = True):
        self.allocator = allocator
        self.enabled = enabled
        self.entries: collections.OrderedDict[str, CachedImage] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @property
    def idle_pages(self) -> int:
        return sum(len(e.pages) for e in self.entries.values() if e.users == 0)

    def available(self) -> int:
        """Pages that a new request could have: free ones and those of unused cached images."""
        return self.allocator.free + self.idle_pages

    def lookup(self, key: str) -> CachedImage | None:
        entry = self.entries.get(key) if self.enabled else None
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def take(self, count: int) -> list[int]:
        """Free pages, evicting unused cached images as needed."""
        while self.allocator.free < count:
            victim = next((k for k, e in self.entries.items() if e.users == 0), None)
            if victim is None:
                raise OutOfPages(f"{count} tile pages asked for, {self.allocator.free} free and none cached idle")
            self.allocator.give(self.entries.pop(victim).pages)
            self.evictions += 1
        return self.allocator.take(count)

    def add(self, key: str | None, pages: list[int]) -> CachedImage:
        """A new entry for pages about to be filled (kept under `key` if caching is on and key is not None)."""
        entry = CachedImage(pages, users=1)
        if key is not None and self.enabled:
            self.entries[key] = entry
        return entry

    def release(self, key: str | None, entry: CachedImage) -> None:
        """A request is done with an image's pages: cached ones stay (unused, evictable); uncached ones, and
        those never filled (its prefill failed), go back."""
        entry.users -= 1
        if entry.users > 0 or (key is not None and self.enabled and entry.ready):
            return
        if key is not None and self.entries.get(key) is entry:
            del self.entries[key]
        self.allocator.give(entry.pages)


def describe_images(inputs: dict, max_images: int, max_tiles: int, compat: str) -> list[tuple[str | None, int]]:
    """Per image of a request: its image-cache key (None: not cacheable) and the tile pages it takes.

    An image whose rows see exactly its real tiles (what the processor's masks say) takes one page per real
    tile and is cached by its pixels. Anything else (a mask that shows padding tiles or no tile of it, no
    mask at all, or compat="transformers", where rows that see no image attend to every tile) takes a page
    for each of its max_num_tiles tiles and is not cached."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return []
    if pixels.dim() != 6 or pixels.shape[0] != 1:
        raise ValueError(f"pixel_values of one request must be [1, images, tiles, 3, height, width], got "
                         f"{list(pixels.shape)}")
    count, tiles = pixels.shape[1], pixels.shape[2]
    if count > max_images or tiles > max_tiles:
        raise ValueError(f"the request has {count} images of {tiles} tiles: this engine takes at most "
                         f"{max_images} images (--max-images-per-request) of {max_tiles} tiles")
    ratio_ids, ratio_mask = inputs.get("aspect_ratio_ids"), inputs.get("aspect_ratio_mask")
    mask = inputs.get("cross_attention_mask")
    plain = (mask is not None and ratio_ids is not None and ratio_mask is not None
             and compat == "meta" and mask.shape[2:] == (count, tiles))
    described = []
    for n in range(count):
        if plain:
            real = int(ratio_mask[0, n].sum())
            seen = mask[0, :, n].bool().any(dim=0)
            if real and bool(seen[:real].all()) and not bool(seen[real:].any()):
                described.append((image_key(pixels[0, n, :real], int(ratio_ids[0, n]), real), real))
                continue
        described.append((None, max_tiles))
    return described


@dataclass
class Holding:
    """The pages one request holds."""
    self_pages: list[int] = field(default_factory=list)
    images: list[tuple[str | None, CachedImage]] = field(default_factory=list)  # (cache key or None, entry)


class PagedCaches:
    """The page pools, the per-slot tables of the decode step, and the layer views over them."""

    def __init__(self, text_model, slots: int, self_pages: int, tile_pages: int, max_len: int,
                 max_tiles_per_row: int, tile_tokens: int, device, dtype, cache_images: bool = True,
                 kv_cache_dtype: str = "auto"):
        check_kv_cache_dtype(kv_cache_dtype)
        config = text_model.config
        kv, hd = config.num_key_value_heads, config.head_dim
        self.cross_layers = [i for i in range(config.num_hidden_layers) if i in set(config.cross_attention_layers)]
        self.self_layers = [i for i in range(config.num_hidden_layers) if i not in set(config.cross_attention_layers)]
        self.dtype, self.fp8 = dtype, kv_cache_dtype == "fp8"
        # k/v[layer]: [pages, kv, PAGE_TOKENS, hd]; ck/cv[layer]: [tile pages, kv, tile_tokens, hd]; the *s dicts
        # hold their FP8 scales (empty otherwise)
        self.k, self.v, self.ks, self.vs = _pools(self.self_layers, (self_pages, kv, PAGE_TOKENS, hd), dtype, device,
                                                  self.fp8)
        self.ck, self.cv, self.cks, self.cvs = _pools(self.cross_layers, (tile_pages, kv, tile_tokens, hd), dtype,
                                                      device, self.fp8)
        self.tile_tokens = tile_tokens
        self.max_self_pages = -(-max_len // PAGE_TOKENS)
        self.self_table = torch.zeros(slots, self.max_self_pages, dtype=torch.int32, device=device)
        self.cross_table = torch.zeros(slots, max(1, max_tiles_per_row), dtype=torch.int32, device=device)
        self.cross_len = torch.zeros(slots, dtype=torch.int32, device=device)
        self.row_mask = torch.zeros(slots, 1, 1, 1, dtype=dtype, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # written by the decode runner
        self.self_allocator = PageAllocator(self_pages)
        self.images = ImageCache(PageAllocator(tile_pages), enabled=cache_images)
        self.views = {i: PagedKV(self, i) for i in self.self_layers}
        self.views.update({i: PagedCrossKV(self, i) for i in self.cross_layers})
        self.bytes_per_self_page, self.bytes_per_tile_page = page_bytes(config, tile_tokens, dtype, kv_cache_dtype)

    # -- bookkeeping ------------------------------------------------------------------------------------------
    @staticmethod
    def self_pages_for(tokens: int) -> int:
        return -(-tokens // PAGE_TOKENS)

    def bind_row(self, slot: int, holding: Holding, visible_pages: list[int], row_mask: float) -> None:
        """Points slot's tables at the request's pages: self pages in order, the tile pages its decode sees.
        (Queued behind the step in flight, which may still read the slot's old tables: no host wait.)"""
        width = self.self_table.shape[1] + self.cross_table.shape[1]
        host = torch.zeros(width + 1, dtype=torch.int32)
        host[:len(holding.self_pages)] = torch.tensor(holding.self_pages, dtype=torch.int32)
        start = self.self_table.shape[1]
        host[start:start + len(visible_pages)] = torch.tensor(visible_pages, dtype=torch.int32)
        host[-1] = len(visible_pages) * self.tile_tokens
        if self.self_table.device.type == "cuda":
            host = host.pin_memory()
        device = host.to(self.self_table.device, non_blocking=True)
        self.self_table[slot].copy_(device[:start])
        self.cross_table[slot].copy_(device[start:-1])
        self.cross_len[slot:slot + 1].copy_(device[-1:])
        self.row_mask[slot] = row_mask

    def unbind_row(self, slot: int) -> None:
        """A free slot reads and writes the scratch page only."""
        self.self_table[slot].zero_()
        self.cross_table[slot].zero_()
        self.cross_len[slot] = 0
        self.row_mask[slot] = 0.0

    def release(self, holding: Holding) -> None:
        self.self_allocator.give(holding.self_pages)
        for key, entry in holding.images:
            self.images.release(key, entry)
        holding.self_pages, holding.images = [], []

    def check_fits(self, prompt_len: int, max_tokens: int, images: list[tuple[str | None, int]]) -> None:
        """Refuses at once, with the numbers, a request that could never fit the page pools."""
        c = self
        need = c.self_pages_for(prompt_len + max_tokens)
        if need > c.self_allocator.total:
            raise RequestTooLong(f"the prompt ({prompt_len} tokens) and max_tokens "
                                 f"({max_tokens}) need {need} K/V pages of {PAGE_TOKENS} tokens "
                                 f"but the pool has {c.self_allocator.total} (--gpu-memory-utilization sizes it)")
        tiles = sum(t for _, t in images)
        if tiles > c.images.allocator.total:
            raise RequestTooLong(f"the request's images need {tiles} tile pages but the pool has "
                                 f"{c.images.allocator.total} (--gpu-memory-utilization sizes it)")

    def reserve(self, tokens: int, images: list[tuple[str | None, int]]) -> Holding | None:
        """Takes the pages of a request of `tokens` tokens (prompt + max_tokens) and `images` (describe_images),
        all at admission, so that it never runs out later; None, taking nothing, if they are not free now.
        Cached images are shared, not taken again."""
        c = self
        need = c.self_pages_for(tokens)
        if need > c.self_allocator.free:
            return None
        found: dict[str, object] = {}
        for key, _ in images:  # (an image given twice in one request counts once)
            if key is not None and key not in found:
                found[key] = c.images.lookup(key)
        hits = [entry for entry in found.values() if entry is not None]
        for entry in hits:
            entry.users += 1  # held, so the eviction below cannot take it
        fresh = sum(tiles for key, tiles in images if key is None) + \
            sum(tiles for key, tiles in dict(images).items() if key is not None and found[key] is None)
        if fresh > c.images.available():
            for entry in hits:
                entry.users -= 1
            return None
        holding = Holding(self_pages=c.self_allocator.take(need))
        for key, tiles in images:
            entry = found.get(key) if key is not None else None
            if entry is None:
                entry = c.images.add(key, c.images.take(tiles))
                c.images.misses += key is not None
                if key is not None:
                    found[key] = entry
            elif any(k == key for k, _ in holding.images):
                entry.users += 1  # the same image again in this request
            else:
                c.images.hits += 1
            holding.images.append((key, entry))
        return holding

    # -- data --------------------------------------------------------------------------------------------------
    def store_prompt(self, pages: list[int], keys: dict, values: dict, row: int, start: int, length: int) -> None:
        """Copies a prefill's self-attention K/V (keys[i]: [rows, kv_heads, width, head_dim]) of `row`, tokens
        start..start+length-1, into `pages` (the first self.self_pages_for(length) of them)."""
        count = self.self_pages_for(length)
        index = torch.tensor(pages[:count], device=self.self_table.device)
        padded = count * PAGE_TOKENS
        for i in self.self_layers:
            for pool, scales, source in ((self.k[i], self.ks.get(i), keys[i]), (self.v[i], self.vs.get(i), values[i])):
                part = source[row, :, start:start + length]
                if padded > length:
                    part = torch.nn.functional.pad(part, (0, 0, 0, padded - length))
                _store(pool, scales, index, part.reshape(part.shape[0], count, PAGE_TOKENS, -1).transpose(0, 1))

    def store_tiles(self, pages: list[int], keys: dict, values: dict, row: int, tiles: list[int]) -> None:
        """Copies the vision K/V of tiles `tiles` (indices along the prefill cache's tile axis) of `row` into
        the tile pages `pages` (one each)."""
        index = torch.tensor(pages, device=self.self_table.device)
        source_tiles = torch.tensor(tiles, device=self.self_table.device)
        for i in self.cross_layers:
            for pool, scales, source in ((self.ck[i], self.cks.get(i), keys[i]),
                                         (self.cv[i], self.cvs.get(i), values[i])):
                kv, _, hd = source.shape[1:]
                per_tile = source[row].reshape(kv, -1, self.tile_tokens, hd).index_select(1, source_tiles)
                _store(pool, scales, index, per_tile.transpose(0, 1))

    def prompt_keys(self, pages: list[int], length: int) -> dict:
        """Self-attention keys of tokens 0..length-1 stored in `pages`, per layer [kv_heads, length, head_dim]
        (for inspection: the decode step reads the pages in place)."""
        index = torch.tensor(pages[:self.self_pages_for(length)], device=self.self_table.device)
        scales = {i: self.ks[i].index_select(0, index) if self.fp8 else None for i in self.self_layers}
        return {i: _read(_pages(self.k[i], index), scales[i], self.dtype).transpose(0, 1).flatten(1, 2)[:, :length]
                for i in self.self_layers}

    def gather_tiles(self, pages: list[int]) -> tuple[dict, dict]:
        """Vision K/V of these tile pages, in order, as a prefill cache holds them: [1, kv_heads, n*1601, hd]."""
        index = torch.tensor(pages, device=self.self_table.device)
        out_k, out_v = {}, {}
        for i in self.cross_layers:
            for pool, scales, out in ((self.ck[i], self.cks.get(i), out_k), (self.cv[i], self.cvs.get(i), out_v)):
                tiles = _read(_pages(pool, index), None if scales is None else scales.index_select(0, index),
                              self.dtype)                             # [n, kv, 1601, hd]
                out[i] = tiles.transpose(0, 1).reshape(1, tiles.shape[1], -1, tiles.shape[-1])
        return out_k, out_v


@dataclass
class PoolPlan:
    slots: int  # decode rows (--max-batch)
    self_pages: int  # pages of PAGE_TOKENS tokens, scratch page included
    tile_pages: int  # pages of one image tile, scratch page included
    budget_bytes: int  # what the pools may take


def page_bytes(text_config, tile_tokens: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> tuple[int, int]:
    """Bytes of one self-attention page (all self layers) and of one tile page (all cross layers), scales
    included."""
    per_token_layer = kv_bytes_per_token(text_config, dtype) if kv_cache_dtype != "fp8" else \
        kv_bytes_per_token(text_config, FP8) + 2 * text_config.num_key_value_heads * 4  # + a float32 scale each
    cross = len(set(text_config.cross_attention_layers))
    return ((text_config.num_hidden_layers - cross) * PAGE_TOKENS * per_token_layer,
            cross * tile_tokens * per_token_layer)


def plan_pools(text_config, tile_tokens: int, max_tiles: int, *, device: torch.device, dtype: torch.dtype,
               max_batch: int | None, max_model_len: int, max_images: int, gpu_memory_utilization: float,
               cross_share: float, workspace_bytes: int, pages: tuple[int, int] | None = None,
               kv_cache_dtype: str = "auto") -> PoolPlan:
    """How many pages of each kind, and how many decode rows.

    On CUDA the pools take what is left of `gpu_memory_utilization` x the GPU's memory after what torch holds
    already (the weights) and `workspace_bytes` (prefill and encoder activations, graphs), split `cross_share`
    for image tiles and the rest for text; --max-batch defaults to what the text pages support, capped at 256.
    Elsewhere (CPU tests) the pools hold the worst case of `max_batch` (default 8) full requests.
    """
    self_page, tile_page = page_bytes(text_config, tile_tokens, dtype, kv_cache_dtype)
    if pages is not None:  # given: (text pages, tile pages), scratch pages included
        slots = (8 if device.type != "cuda" else min(256, pages[0] - 1)) if max_batch is None else max_batch
        return PoolPlan(slots, pages[0], pages[1], (pages[0] - 1) * self_page + (pages[1] - 1) * tile_page)
    if device.type != "cuda":
        slots = 8 if max_batch is None else max_batch
        self_pages = slots * -(-max_model_len // PAGE_TOKENS) + 1
        tile_pages = slots * max_images * max_tiles + 1
        return PoolPlan(slots, self_pages, tile_pages, (self_pages - 1) * self_page + (tile_pages - 1) * tile_page)
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_allocated(device)
    budget = min(int(gpu_memory_utilization * total) - held, free) - workspace_bytes
    share = cross_share if tile_page else 0.0
    self_pages = int(budget * (1 - share) // self_page) + 1 if self_page else 2
    tile_pages = int(budget * share // tile_page) + 1 if tile_page else 2
    if self_pages < 2 or (tile_page and tile_pages < 2):
        raise ValueError(f"no GPU memory is left for the K/V caches: {gpu_memory_utilization:.2f} of "
                         f"{total / 2**30:.1f} GiB (--gpu-memory-utilization) minus {held / 2**30:.1f} GiB of "
                         f"weights and {workspace_bytes / 2**30:.1f} GiB of workspace leaves "
                         f"{budget / 2**30:.2f} GiB; raise --gpu-memory-utilization or use a smaller model")
    slots = min(256, self_pages - 1) if max_batch is None else max_batch
    return PoolPlan(slots, self_pages, tile_pages, budget)


@torch.library.custom_op("mllama::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, table: torch.Tensor,
                     lengths: torch.Tensor, k_scales: torch.Tensor | None,
                     v_scales: torch.Tensor | None) -> torch.Tensor:
    return paged_decode_attention(q, k_pages, v_pages, table, lengths, k_scales=k_scales, v_scales=v_scales)


@_paged_attention.register_fake
def _(q, k_pages, v_pages, table, lengths, k_scales, v_scales):
    return torch.empty_like(q)


@torch.library.custom_op("mllama::write_pages", mutates_args=("k_pages", "v_pages"))
def _write_pages(k_pages: torch.Tensor, v_pages: torch.Tensor, table: torch.Tensor, positions: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> None:
    write_pages(k_pages, v_pages, table, positions, k, v)


@torch.library.custom_op("mllama::write_fp8_pages", mutates_args=("k_pages", "v_pages", "k_scales", "v_scales"))
def _write_fp8_pages(k_pages: torch.Tensor, v_pages: torch.Tensor, k_scales: torch.Tensor, v_scales: torch.Tensor,
                     table: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    write_pages(k_pages, v_pages, table, positions, k, v, k_scales, v_scales, quantized=(k_scale, v_scale))


class PagedKV:
    """One self-attention layer's pages, as the decode step's layers see them (one new token per row: rows 0..n-1
    of the caches' tables, at `positions`)."""

    def __init__(self, caches: PagedCaches, layer: int):
        self.caches, self.k_pages, self.v_pages = caches, caches.k[layer], caches.v[layer]
        self.k_scales, self.v_scales = caches.ks.get(layer), caches.vs.get(layer)

    def attend(self, layer_idx, q, k, v, mask, implementation=None, weights=None) -> torch.Tensor:
        n = q.shape[0]
        c = self.caches
        positions, table = c.positions[:n], c.self_table[:n]
        if self.k_scales is None:
            _write_pages(self.k_pages, self.v_pages, table, positions, k[:, :, 0], v[:, :, 0])
        else:  # quantized here, in the compiled layer (fused with what made k and v), written by the op
            (kq, ks), (vq, vs) = quantize_rows(k[:, :, 0]), quantize_rows(v[:, :, 0])
            _write_fp8_pages(self.k_pages, self.v_pages, self.k_scales, self.v_scales, table, positions, kq, vq,
                             ks[..., 0], vs[..., 0])
        lengths = (positions + 1).to(torch.int32)
        return _paged_attention(q[:, :, 0], self.k_pages, self.v_pages, table, lengths, self.k_scales,
                                self.v_scales)[:, :, None]


class PagedCrossKV:
    """One cross-attention layer's tile pages: each row attends over the tiles its last prompt token saw."""

    def __init__(self, caches: PagedCaches, layer: int):
        self.caches, self.k_pages, self.v_pages = caches, caches.ck[layer], caches.cv[layer]
        self.k_scales, self.v_scales = caches.cks.get(layer), caches.cvs.get(layer)

    def cross_attend(self, layer_idx, q, mask, implementation=None, weights=None) -> torch.Tensor:
        n = q.shape[0]
        c = self.caches
        return _paged_attention(q[:, :, 0], self.k_pages, self.v_pages, c.cross_table[:n], c.cross_len[:n],
                                self.k_scales, self.v_scales)[:, :, None]
