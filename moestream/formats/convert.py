"""Streaming conversion of a Hugging Face MoE checkpoint into an expert-shard store.

Peak memory stays near a few experts (one per encoder thread, each with its source bits and
candidate encodings) plus the largest dense tensor: tensors are read with pread and written,
in order, as soon as they are encoded."""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import zstandard
from tqdm import tqdm

from ..errors import ConvertError
from .codecs import (EncodedPlanes, EncodedRegion, EncodeOptions, bits_to_float32, cast_bits,
                     delta_amplitude_may_win, encode_region, float32_to_bits, shuffle, zstd_sample_may_pay)
from .constants import (DEFAULT_GROUP_SIZE, DEFAULT_ZSTD_LEVEL, DEFAULT_ZSTD_MIN_SAVING, DELTA_PROBE_ELEMENTS,
                        DELTA_PROBE_EXPERTS, DTYPE_BITS_NUMPY, DTYPE_ITEMSIZE, FLOAT8_QUANTS, INT_QUANTS, KEPT_QUANTS,
                        MIXED_QUANT, QUANT_CHOICES)
from .families import DeriveFamily, check_config, family_for
from .fp8 import row_group as fp8_row_group
from .mxfp4 import BLOCK as MXFP4_BLOCK
from .gguf_checkpoint import NATIVE_TYPES, GgufCheckpoint, is_gguf
from .hf_checkpoint import HFCheckpoint, TensorInfo
from .writer import ConversionLock, StoreWriter, is_store

#: (architecture, config, moe_layers, experts_per_layer, {dense tensor name: shape}) -> problems, one
#: line each (empty: the forward that runs the store loads them). Given by the engine at the edge.
DenseCheck = Callable[[str, dict, tuple, int, dict], list]


def convert(src: str | os.PathLike, out: str | os.PathLike, *, quant: str = "keep",
            group_size: int = DEFAULT_GROUP_SIZE, zstd_level: Optional[int] = DEFAULT_ZSTD_LEVEL,
            zstd_min_saving: float = DEFAULT_ZSTD_MIN_SAVING, delta: bool = True,
            max_file_size: Optional[int] = None, overwrite: bool = False,
            progress: bool = True, hot_experts: Optional[Iterable[tuple[int, int]]] = None,
            hot_quant: str = "int8", cold_quant: str = "int4", dense_check: Optional[DenseCheck] = None,
            derive_family: Optional[DeriveFamily] = None) -> Path:
    """Convert checkpoint `src` into store directory `out` and return its path. `src`: a Hugging
    Face checkpoint folder (safetensors, one file or sharded), or a GGUF file (one file of a split
    GGUF brings the others; needs the gguf package, formats/gguf_checkpoint.py).

    quant: "keep" (source dtype), "bf16"/"fp16"/"fp32" (lossless cast of every float tensor), or
    "int8"/"int4" (group-wise quantization of expert tensors; dense tensors keep their dtype).
    zstd_level None disables zstd. zstd_min_saving: an expert extent keeps zstd only when it
    saves at least this share of its stored bytes (default 0.5: decoding costs more than the read
    it saves on NVMe, see constants.DEFAULT_ZSTD_MIN_SAVING; 0 keeps it wherever it saves a
    page, for slow disks). max_file_size (bytes) caps each file of the store.
    hot_experts: mixed precision: these (layer, expert) pairs are quantized with `hot_quant`,
    every other expert with `cold_quant` (e.g. a routing profile's most used 20 %: see
    formats/profile.py); `quant` must then be "keep". The index's quant reads "mixed" and each
    extent's codec chain names its own.
    dense_check: asked, before anything is written, what keeps the checkpoint's dense tensors from
    loading into the forward that will run the store (`moestream.convert` passes the engine's;
    formats cannot know the models); any problem refuses the checkpoint, naming the tensor.
    derive_family: for a family formats/families.py has no record of, derives one (from
    transformers' model class: `moestream.convert` passes engines.derive_family); the store's index
    carries it. Without it such a checkpoint is refused.
    An interrupted conversion run again with the same arguments resumes where it stopped."""
    if quant not in QUANT_CHOICES:
        raise ConvertError(f"--quant {quant!r}: choose one of {', '.join(QUANT_CHOICES)}")
    if hot_experts is not None:
        if quant != "keep":
            raise ConvertError(f"--quant {quant!r} and --profile: a profile picks each expert's quantization")
        for q in (hot_quant, cold_quant):
            if q not in INT_QUANTS:
                raise ConvertError(f"hot/cold quantization {q!r}: choose one of {', '.join(INT_QUANTS)}")
        hot_experts = frozenset(hot_experts)
        quant = MIXED_QUANT
    if quant in (*INT_QUANTS, MIXED_QUANT) and (group_size < 2 or group_size % 2 or group_size > 1 << 16):
        raise ConvertError(f"--group-size {group_size}: must be an even number between 2 and 65536")
    if zstd_level is not None and not (-7 <= zstd_level <= 22):
        raise ConvertError(f"--zstd-level {zstd_level}: must be between -7 and 22")
    if not 0 <= zstd_min_saving < 1:
        raise ConvertError(f"--zstd-min-saving {zstd_min_saving}: must lie in [0, 1)")
    if max_file_size is not None and max_file_size < 1 << 20:
        raise ConvertError(f"--max-file-size {max_file_size}: must be at least 1 MiB")
    out = Path(out)
    _check_output_is_not_source(Path(src), out)
    with ConversionLock(out):
        return _convert_locked(src, out, quant=quant, group_size=group_size, zstd_level=zstd_level,
                               zstd_min_saving=zstd_min_saving, delta=delta,
                               max_file_size=max_file_size, overwrite=overwrite, progress=progress,
                               mixed=(hot_experts, hot_quant, cold_quant) if quant == MIXED_QUANT else None,
                               dense_check=dense_check, derive_family=derive_family)


def _check_output_is_not_source(src: Path, out: Path) -> None:
    """OUT, its staging directory and its lock file must not be the source or hold it."""
    s = src.resolve()
    for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".lock")):
        r = p.resolve()
        if r == s or r in s.parents:
            raise ConvertError(f"{p}: is the source checkpoint or holds it; choose another output path")


def _convert_locked(src, out: Path, *, quant, group_size, zstd_level, zstd_min_saving, delta, max_file_size, overwrite,
                    progress, mixed=None, dense_check: Optional[DenseCheck] = None,
                    derive_family: Optional[DeriveFamily] = None) -> Path:
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConvertError(f"{out}: already exists (pass --overwrite to replace it)")
        if not is_store(out):
            raise ConvertError(f"{out}: exists and is not a moestream store; --overwrite replaces only a store "
                               "(remove it yourself if it is yours to delete)")
    ckpt = open_checkpoint(src)
    config = ckpt.config
    if ckpt.fp8_block is not None or ckpt.mxfp4:
        # the store holds the dequantized weights: transformers must not treat them as FP8/MXFP4
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    fam = family_for(config, ckpt.config_label(), derive_family)
    check_config(ckpt.config, ckpt.config_label(), family=fam)
    n_experts = fam.num_experts(ckpt.config)
    n_layers = ckpt.config["num_hidden_layers"]
    moe_layers = [l for l in range(n_layers) if fam.expert_tensor_name(l, 0, fam.expert_tensors[0]) in ckpt]
    if not moe_layers:
        example = fam.expert_tensor_name(0, 0, fam.expert_tensors[0])
        raise ConvertError(f"{ckpt.root}: no expert tensors found (expected names like {example}); "
                           "is its model_type right?")
    expert_names = {fam.expert_tensor_name(l, e, t) for l in moe_layers for e in range(n_experts)
                    for t in fam.expert_tensors}
    for name in sorted(expert_names):
        ckpt.info(name)  # raises ConvertError naming the missing tensor
    _check_shapes(ckpt, fam, moe_layers, n_experts, expert_names)
    # a GGUF whose experts are all of one block type that is one of ours (gguf_checkpoint.NATIVE_TYPES):
    # `keep` stores those blocks re-laid out as our group-wise type, without going through floats
    native = None
    if quant == "keep" and isinstance(ckpt, GgufCheckpoint):
        # the experts' matrices (a fused layout's [E, ...] tensors one dimension more; biases stay as they are)
        types = {ckpt.info(n).ggml_type for n in expert_names if len(ckpt.info(n).shape) >= 2 + fam.fused}
        native = types.pop() if len(types) == 1 and types <= NATIVE_TYPES.keys() else None
        if native is not None:
            quant, group_size, _ = NATIVE_TYPES[native]
            delta = False
    # an FP8 checkpoint whose experts are all float8 of one format: `keep` stores their codes and
    # block multipliers as they are (formats/fp8.py), in groups that lie inside a block and a row
    fp8_why = None
    if quant == "keep" and ckpt.fp8_block is not None:
        formats = {ckpt.info(n).fp8.fmt if ckpt.info(n).fp8 is not None else None for n in expert_names}
        group = fp8_row_group({ckpt.info(n).shape[-1] for n in expert_names}, ckpt.fp8_block)
        if None in formats or len(formats) > 1:
            fp8_why = "its experts are not all float8 of one format"
        elif group is None:
            fp8_why = f"an expert width and the {ckpt.fp8_block[1]}-column blocks leave no even group along rows"
        else:
            native = quant = formats.pop()
            group_size, delta = group, False
    # an MXFP4 checkpoint (GPT-OSS): `keep` stores its experts' blocks and exponents as they are
    # (formats/mxfp4.py: the [out, in] rows of the model's [in, out] matrices, TensorSlice.transposed)
    if quant == "keep" and ckpt.mxfp4:
        native = quant = "mxfp4"
        group_size, delta = MXFP4_BLOCK, False
    dense_names = [n for n in ckpt.tensors if n not in expert_names]
    if dense_check is not None:
        problems = dense_check(fam.name, config, tuple(moe_layers), n_experts,
                               {n: ckpt.info(n).shape for n in dense_names})
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ConvertError(f"{ckpt.root}: the {fam.name} model could not load this checkpoint's dense tensors: "
                               + "; ".join(problems[:3]) + more)

    if mixed is not None:
        unknown = sorted(k for k in mixed[0] if k[0] not in moe_layers or not 0 <= k[1] < n_experts)
        if unknown:
            raise ConvertError(f"the routing profile names experts this checkpoint lacks, e.g. layer {unknown[0][0]} "
                               f"expert {unknown[0][1]} (it has MoE layers {moe_layers} x {n_experts} experts)")
    raw_dtype = None if quant in ("keep", MIXED_QUANT, *INT_QUANTS, *KEPT_QUANTS) else quant

    def expert_dtype(info: TensorInfo) -> str:
        # an FP8 weight not kept as FP8 reads as its exact float32 values: those are quantized, and `keep` stores bf16
        return raw_dtype or (info.keep_dtype if quant == "keep" else info.dtype)
    z = dict(zstd_level=zstd_level, zstd_min_saving=zstd_min_saving)
    opts = EncodeOptions(quant=quant if quant in (*INT_QUANTS, *KEPT_QUANTS) else None, group_size=group_size,
                         delta=delta, **z)
    if mixed is not None:
        hot_opts = EncodeOptions(quant=mixed[1], group_size=group_size, delta=delta, **z)
        opts = EncodeOptions(quant=mixed[2], group_size=group_size, delta=delta, **z)
    lossless = EncodeOptions(quant=None, delta=False, **z)
    fingerprint = hashlib.sha256(json.dumps({
        "src": str(ckpt.root.resolve()),
        "tensors": sorted((t.name, str(t.path), t.offset, t.length, os.path.getmtime(t.path))
                          for t in ckpt.tensors.values()),
        "opts": [quant, group_size, zstd_level, zstd_min_saving, delta, max_file_size],
        "mixed": None if mixed is None else [sorted(mixed[0]), mixed[1], mixed[2]],
    }).encode()).hexdigest()
    # the files the store carries (a GGUF's tokenizer.json is built from its metadata): once, for
    # the blobs and for the copies beside the store
    copies = ckpt.copies()
    writer = StoreWriter(out, fingerprint=fingerprint, max_file_size=max_file_size)
    workers = encode_workers()
    # one thread more than cores: at any time one of them is usually waiting on its read
    encoders = ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="moestream-encode")
    # the kernel read-ahead and each layer's delta probe (reads: a thread of their own, off this one,
    # which writes every extent in order: on 2 cores this thread was the pipeline's bound, a third
    # of its time in read-ahead calls, checksums and the probes, py-spy)
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moestream-readahead")
    # experts submitted and not yet written: enough that the encoders stay busy while this thread
    # writes and fsyncs; each holds its encoded bytes once done (a bound of the converter's memory)
    in_flight = 2 * workers
    total = sum(t.length for t in ckpt.tensors.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {ckpt.root.name}", disable=not progress,
               dynamic_ncols=True)
    try:
        if writer.resumed:
            bar.write(f"resuming an interrupted conversion into {writer.staging}")
        elif writer.restart_reason:
            bar.write(f"cannot resume the interrupted conversion in {writer.staging} ({writer.restart_reason}); "
                      "starting over")
        if not writer.done("dense"):
            if ckpt.fp8_block is not None:
                b = ckpt.fp8_block
                if quant in FLOAT8_QUANTS:
                    experts = (f"experts kept as {quant}: their codes and block multipliers as they are, in groups "
                               f"of {group_size} along rows")
                elif fp8_why is not None:
                    experts = f"--quant keep experts dequantized to bf16 ({fp8_why})"
                else:
                    experts = f"experts dequantized, then stored as {quant}"
                bar.write(f"FP8 checkpoint ({b[0]}x{b[1]} blocks): {experts}; dense weights dequantized to "
                          + ("bf16" if raw_dtype is None else raw_dtype))
            if ckpt.mxfp4:
                bar.write("MXFP4 checkpoint: " + (
                    "experts kept as mxfp4: their blocks and exponents as they are (17 bytes per 32 weights)"
                    if quant == "mxfp4" else "experts decoded exactly to bf16"
                    + (f", then stored as {quant}" if quant not in ("keep", "bf16") else "")))
            for name in dense_names:
                info = ckpt.info(name)
                dt = raw_dtype or info.keep_dtype
                bits = cast_bits(ckpt.read(name), info.dtype, dt)
                writer.add_dense(name, encode_region([(name, dt, info.shape, bits)], lossless), info.length)
                bar.update(info.length)
            if isinstance(ckpt, GgufCheckpoint):
                _note_gguf(ckpt, quant, native, expert_names, bar.write)
            for name, blob in copies.items():
                if name != "config.json":
                    writer.add_blob(name, _blob(np.frombuffer(blob, np.uint8), zstd_level))
            writer.checkpoint("dense")
        else:
            bar.update(sum(ckpt.info(n).length for n in dense_names))
        def layer_infos(layer: int) -> list:
            return [_expert_info(ckpt, fam, layer, 0, t) for t in fam.expert_tensors]

        def probe(layer: int):
            # the delta probe of `layer` (a few MiB of reads), on the helper thread
            infos = layer_infos(layer)
            return helper.submit(_delta_may_pay, ckpt, fam, layer, n_experts, opts, [expert_dtype(i) for i in infos],
                                 infos) if delta else None
        todo = [l for l in moe_layers if not writer.done(f"layer{l}")]
        probes = {todo[0]: probe(todo[0])} if todo else {}
        for layer in moe_layers:
            layer_bytes = sum(_expert_info(ckpt, fam, layer, e, t).length
                              for e in range(n_experts) for t in fam.expert_tensors)
            if writer.done(f"layer{layer}"):
                bar.update(layer_bytes)
                continue
            nxt = todo.index(layer) + 1
            if nxt < len(todo):             # probed while this layer is encoded
                probes[todo[nxt]] = probe(todo[nxt])
            infos = layer_infos(layer)
            store_dtypes = [expert_dtype(i) for i in infos]
            base = base_dtype = None
            if delta and probes.pop(layer).result():
                base, base_dtype = _layer_base(ckpt, fam, layer, n_experts, opts, store_dtypes, infos, encoders,
                                               workers)
            uses_base = False
            # experts are read and encoded on the encoder threads (pread, numpy and zstd release
            # the GIL) while this one writes the finished ones in order; at most in_flight experts
            # are in memory
            pending: deque = deque()

            def write_oldest() -> bool:
                e, src_len, fut = pending.popleft()
                r = writer.add_extent(layer, e, fut.result(), src_len)
                bar.update(src_len)
                return any(s in r.chain for s in ("delta", "xor-delta"))

            def read_and_encode(e: int, expert_infos: list, expert_opts: EncodeOptions, base=base,
                                base_dtype=base_dtype) -> EncodedRegion:
                tensors = []
                for t, info in zip(fam.expert_tensors, expert_infos):
                    dt = expert_dtype(info)
                    # a native store's weights as their own planes; the tensors beside them (biases) as they are
                    tensors.append((t, dt, info.shape, EncodedPlanes(f"{quant}:{group_size}",
                                                                     ckpt.read_planes(info, group_size),
                                                                     transposed=ckpt.planes_transposed(info))
                                    if native and _has_planes(info) else cast_bits(ckpt.read_info(info), info.dtype, dt)))
                return encode_region(tensors, expert_opts, base, base_dtype)

            for e in range(n_experts):
                expert_infos = [_expert_info(ckpt, fam, layer, e, t) for t in fam.expert_tensors]
                for info, first in zip(expert_infos, infos):
                    if info.shape != first.shape:
                        raise ConvertError(f"{info.path}: {info.name} has shape {info.shape}, expert 0 of the "
                                           f"layer has {first.shape}")
                src_len = sum(i.length for i in expert_infos)
                # the kernel reads ahead the expert that will be submitted once this window has
                # moved on: a worker's pread then finds it in the page cache, not on the disk
                pos = moe_layers.index(layer) * n_experts + e       # in the read order of every expert
                for ahead in (range(pos, pos + in_flight + 1) if e == 0 else (pos + in_flight,)):
                    if ahead < len(moe_layers) * n_experts:
                        l, x = moe_layers[ahead // n_experts], ahead % n_experts
                        helper.submit(_read_ahead, [_expert_info(ckpt, fam, l, x, t) for t in fam.expert_tensors])
                expert_opts = hot_opts if mixed is not None and (layer, e) in mixed[0] else opts
                pending.append((e, src_len, encoders.submit(read_and_encode, e, expert_infos, expert_opts)))
                while len(pending) > in_flight:
                    uses_base |= write_oldest()
            while pending:
                uses_base |= write_oldest()
            if uses_base:  # written after the experts, and only when some extent refers to it
                writer.add_base(layer, encode_region(
                    [(t, base_dtype, i.shape, base[t]) for t, i in zip(fam.expert_tensors, infos)], lossless))
            writer.checkpoint(f"layer{layer}")
        if config is not ckpt.config:
            copies["config.json"] = json.dumps(config, indent=2).encode()
        path = writer.finish(
            copies, architecture=fam.name, config=config, moe_layers=tuple(moe_layers), experts_per_layer=n_experts,
            expert_tensors=fam.expert_tensors, quant=quant, family=fam if fam.derived else None,
            group_size=group_size if quant in (*INT_QUANTS, *KEPT_QUANTS, MIXED_QUANT) else 0,
            source_bytes=total)
    except BaseException:
        writer.abandon()
        raise
    finally:
        encoders.shutdown(wait=True, cancel_futures=True)
        helper.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return path


def encode_workers() -> int:
    """Threads that encode experts during a conversion: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def open_checkpoint(src: str | os.PathLike) -> "HFCheckpoint | GgufCheckpoint":
    """The checkpoint at `src`: a GGUF file (or one file of a split GGUF), else a Hugging Face
    checkpoint folder."""
    if is_gguf(src):
        return GgufCheckpoint(src)
    if str(src).endswith(".gguf") and Path(src).is_file():
        raise ConvertError(f"{src}: not a GGUF file (it does not start with the GGUF magic)")
    return HFCheckpoint(src)


def _note_gguf(ckpt: GgufCheckpoint, quant: str, native: Optional[str], expert_names: set, write) -> None:
    """What the conversion of a GGUF does with its quantized tensors and its tokenizer."""
    counts = Counter(t.ggml_type for t in ckpt.tensors.values() if t.ggml_type is not None)
    if counts:
        kinds = ", ".join(f"{n} {k}" for k, n in counts.most_common())
        if native is not None:
            kind, group, exact = NATIVE_TYPES[native]
            experts = (f"{native} experts kept as {kind} in groups of {group} ("
                       + ("the same codes and scales" if exact else "the same codes; scale products rounded to fp16")
                       + ")")
        elif quant == "keep" and {ckpt.info(n).ggml_type for n in expert_names} - {None} == {"MXFP4"}:
            experts = "MXFP4 experts decoded exactly to bf16 (every MXFP4 value is one)"
        elif quant == "keep":
            experts = f"--quant keep experts as bf16 (only experts all of one of {', '.join(NATIVE_TYPES)} keep their blocks)"
        else:
            experts = f"experts as {quant}"
        write(f"GGUF {ckpt.arch.name} ({kinds} tensors): quantized dense tensors dequantized by gguf-py's reference "
              f"dequantizer and stored as bf16; {experts}")
    note = ckpt.tokenizer_note()
    if note is not None:
        write(f"no tokenizer.json in the store: {note} (generate and serve need token ids or a tokenizer)")


def _has_planes(info: TensorInfo) -> bool:
    """Whether a checkpoint tensor is quantized in a form a native store keeps (FP8, MXFP4, a GGUF block type)."""
    return info.fp8 is not None or info.mxfp4 is not None or info.ggml_type is not None


def _expert_info(ckpt: HFCheckpoint, fam, layer: int, expert: int, tensor: str) -> TensorInfo:
    """Where `tensor` of (layer, expert) lies in the checkpoint: its own tensor, or its row of
    the layer's fused [E, ...] tensor."""
    name = fam.expert_tensor_name(layer, expert, tensor)
    return ckpt.row(name, expert) if fam.fused else ckpt.info(name)


def _check_shapes(ckpt: HFCheckpoint, fam, moe_layers: list[int], n_experts: int, expert_names: set[str]) -> None:
    """Every tensor whose shape the config fixes has that shape, and no expert tensor lies
    outside the experts the config declares (it would be stored as a dense tensor and never used)."""
    cfg_path = ckpt.config_label()
    for name in ckpt.tensors:
        idx = fam.expert_index(name)
        if idx is not None and name not in expert_names:
            raise ConvertError(f"{ckpt.info(name).path}: holds expert tensor {name}, but {cfg_path} declares "
                               f"{n_experts} experts per layer and MoE layers {moe_layers}")
    want = fam.expert_shapes(ckpt.config)
    for layer in moe_layers:
        for t in fam.expert_tensors:
            for e in ([0] if fam.fused else range(n_experts)):
                name = fam.expert_tensor_name(layer, e, t)
                info = ckpt.info(name)
                shape = (n_experts, *want[t]) if fam.fused else want[t]
                if info.shape != shape:
                    raise ConvertError(f"{info.path}: {name} has shape {list(info.shape)}; {cfg_path} implies "
                                       f"{list(shape)}")
    for name, shape in fam.dense_shapes(ckpt.config, range(ckpt.config["num_hidden_layers"]), moe_layers).items():
        if name in ckpt and ckpt.info(name).shape != shape:
            raise ConvertError(f"{ckpt.info(name).path}: {name} has shape {list(ckpt.info(name).shape)}; "
                               f"{cfg_path} implies {list(shape)}")


def _blob(data: np.ndarray, zstd_level: Optional[int]):
    """A region holding a file's bytes verbatim (zstd where it pays)."""
    raw = data.tobytes()
    if zstd_level is not None:
        z = zstandard.ZstdCompressor(level=zstd_level).compress(raw)
        if len(z) < len(raw):
            return EncodedRegion(z, len(raw), ("zstd",), (), 0.0)
    return EncodedRegion(raw, len(raw), (), (), 0.0)


def _read_ahead(infos) -> None:
    """Ask the kernel to start reading these tensors' bytes into the page cache (no wait)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for i in infos:
        try:
            fd = os.open(i.path, os.O_RDONLY)
        except OSError:
            return       # the read itself names the file
        try:
            os.posix_fadvise(fd, i.offset, i.length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _delta_may_pay(ckpt, fam, layer, n_experts, opts, store_dtypes, infos) -> bool:
    """Whether coding this layer's experts against its mean could pay, judged on the first
    DELTA_PROBE_ELEMENTS of each tensor of every expert (a few MiB against the whole layer, which
    the base would read a second time): for a quantized store, some probed expert lies within
    DELTA_TRY_AMPLITUDE of the probed mean (codecs.delta_amplitude_may_win); for a lossless one, some
    probed expert's XOR delta, shuffled, compresses by the zstd threshold (codecs.zstd_sample_may_pay).
    Independent experts fail both and take no base; upcycled ones pass. A source whose tensors are
    not plain floats (FP8, MXFP4, GGUF blocks) is not probed: its base is always computed."""
    if opts.quant is None and (opts.zstd_level is None or len(set(store_dtypes)) > 1):
        return False     # an XOR delta saves nothing without zstd, and needs one width
    for t, info, store_dtype in zip(fam.expert_tensors, infos, store_dtypes):
        if info.fp8 is not None or info.mxfp4 is not None or info.ggml_type is not None \
                or info.dtype not in DTYPE_BITS_NUMPY:
            return True
        numel = min(math.prod(info.shape), DELTA_PROBE_ELEMENTS)
        bits_type = DTYPE_BITS_NUMPY[info.dtype]
        nbytes = numel * np.dtype(bits_type).itemsize
        samples = []
        for e in range(n_experts):
            i = _expert_info(ckpt, fam, layer, e, t)
            with open(i.path, "rb") as f:
                raw = os.pread(f.fileno(), nbytes, i.offset)
            if len(raw) != nbytes:
                return True          # let the full read name the short file
            samples.append(np.frombuffer(raw, bits_type))
        values = np.stack([bits_to_float32(x, info.dtype) for x in samples])       # [E, n]
        mean = values.mean(axis=0, dtype=np.float64).astype(np.float32)
        for e in range(min(DELTA_PROBE_EXPERTS, n_experts)):
            if opts.quant is not None:
                if delta_amplitude_may_win(values[e], mean):
                    return True
            else:
                xor = cast_bits(samples[e], info.dtype, store_dtype) ^ float32_to_bits(mean, store_dtype)
                if zstd_sample_may_pay(shuffle(np.frombuffer(xor.tobytes(), np.uint8),
                                               DTYPE_ITEMSIZE[store_dtype]).tobytes(), opts):
                    return True
    return False


def _layer_base(ckpt, fam, layer, n_experts, opts, store_dtypes, infos, pool, workers):
    """Mean of the layer's experts, tensor by tensor, accumulated in float32 one expert at a
    time. Stored in the experts' dtype for lossless stores (XOR delta needs equal widths) and in
    the source dtype for quantized ones."""
    base_dtype = store_dtypes[0] if opts.quant is None else infos[0].dtype
    if opts.quant is None and len(set(store_dtypes)) > 1:
        return None, None     # an XOR delta needs one width: such a layer (MXFP4 weights, fp32 biases) takes none
    def expert_values(e: int, t: str) -> np.ndarray:
        i = _expert_info(ckpt, fam, layer, e, t)
        return bits_to_float32(ckpt.read_info(i), i.dtype)
    base = {}
    for t, info in zip(fam.expert_tensors, infos):
        acc = np.zeros(info.shape, np.float64).reshape(-1)
        # read and widened on the encoder threads (pread and numpy release the GIL), a window of
        # `workers` experts at a time, summed here in order (the same float64 sum as one thread's)
        window: deque = deque()
        for e in range(n_experts):
            window.append(pool.submit(expert_values, e, t))
            if len(window) > workers:
                acc += window.popleft().result()
        while window:
            acc += window.popleft().result()
        base[t] = float32_to_bits((acc / n_experts).astype(np.float32), base_dtype)
    return base, base_dtype
