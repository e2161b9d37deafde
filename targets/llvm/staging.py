"""Input staging of the bit-parallel conv kernels: activation codes as 32-bit words of four
channels, padded (with the code of zero) and split into stride phases, so every tap of every output row reads one
contiguous run of words (shared by the VNNI pixel kernel and the AMX tile kernel)."""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from csqc.targets.tvm.geometry import ConvGeometry
from csqc.targets.tvm.vector_lanes import vector_loop

__all__ = ["MIN_PARALLEL_STAGING", "phase_pairs", "phase_staging", "staging_loop", "task_rows_staging"]

# Inputs of fewer codes than this are staged (padded, regrouped) without a parallel loop of their
# own: the copy then costs less than a fork-join of the thread pool (glue's _MIN_PARALLEL, same
# reason; every ResNet-20 conv input is below it, ImageNet-sized stages are above). The pixel
# conv's tasks stage such inputs' rows themselves (task_rows_staging); the other kernels stage
# them on the calling thread.
MIN_PARALLEL_STAGING = 32768


def staging_loop(geo: ConvGeometry):
    """``T.parallel`` or ``T.serial`` for a conv's input staging loop (see MIN_PARALLEL_STAGING)."""
    codes = geo.batch * geo.in_channels * geo.height * geo.width
    return T.parallel if codes >= MIN_PARALLEL_STAGING else T.serial


def phase_pairs(geo: ConvGeometry):
    """Stride phases ``(a_h, a_w)`` read by some tap, each with the valid column segment
    ``[lo, lo + n)`` of its phase-split rows (``w = sw*j + a_w - pw`` inside the input) and its
    slot; padded to 4 entries with the count of real ones.  None for more than 4 (strides > 2)."""
    sh, sw = geo.stride
    dh, dw = geo.dilation
    ph, pw = geo.padding
    wq = -(-geo.padded_w // sw)
    pairs = []
    for a_h in sorted({r * dh % sh for r in range(geo.kernel_h)}):
        for a_w in sorted({s * dw % sw for s in range(geo.kernel_w)}):
            lo = max(0, -(-(pw - a_w) // sw))
            hi = min(wq, -(-(geo.width + pw - a_w) // sw))
            pairs.append((a_h, a_w, lo, max(0, hi - lo), len(pairs)))
    if len(pairs) > 4:
        return None, 0
    count = len(pairs)
    while len(pairs) < 4:
        pairs.append(pairs[0])
    return pairs, count


def _word_byte(load, cq, t: int, c_groups: int, cg: int):
    """Byte ``t`` of the staged word of channels ``4*(cq % c_groups) .. +3`` of group
    ``cq // c_groups``, shifted into place (zero past the group's ``cg`` channels);
    ``load(channel)`` reads that channel's code."""
    channel = (cq // c_groups) * cg + T.min(cq % c_groups * 4 + t, cg - 1)
    value = tirx.Cast("uint32", load(channel))
    if t:
        value = value << tirx.const(8 * t, "uint32")
    if cg % 4 and t:
        value = tirx.Select(cq % c_groups * 4 + t < cg, value, tirx.const(0, "uint32"))
    return value


# Words a vectorized loop of the staging copies: a row of a 1-D signal is thousands of columns,
# and one vector of them read at stride 2 took LLVM minutes to build (Wav2Vec2's feature
# encoder, 399 columns: 109 s a conv; 1 s in runs of 64). Rows up to _WHOLE_ROW stay one loop.
_RUN, _WHOLE_ROW = 64, 128


def _vector_runs(n: int) -> int:
    """Vectorized loops that copy ``n`` words (a static count): 1 up to ``_WHOLE_ROW``, else
    runs of ``_RUN``, the last ending at ``n`` (overlapping the one before: the same words again)."""
    return 1 if n <= _WHOLE_ROW else -(-n // _RUN)


def _run_width(n: int) -> int:
    """Words each of :func:`_vector_runs`' loops copies."""
    return n if n <= _WHOLE_ROW else _RUN


def _run_start(part, n: int):
    """The first word of run ``part`` of ``n`` (:func:`_vector_runs`)."""
    return 0 if n <= _WHOLE_ROW else T.min(part * _RUN, n - _RUN)


def phase_staging(geo: ConvGeometry, rows: int, fill: int = 0):
    """A macro ``stage(x, xs)`` filling ``xs[B, G*ceil(Cg/4), sh, sw, rows, Wq]`` (uint32) from the
    codes ``x[B, C, H, W]``: word ``xs[b, g*cgroups + cq, a_h, a_w, i, j]`` holds channels
    ``4cq .. 4cq+3`` of group g (bytes 0..3; zero past Cg) at input row ``i*sh + a_h - ph``,
    column ``j*sw + a_w - pw`` (``fill`` in every byte outside the input: the code of zero, 0,
    or ``L`` for offset codes ``code + L``; ``rows >= ceil(Hp/sh)`` rows, the ones past the input
    filled too). None for strides above 2 (more than 4 phases)."""
    if not 0 <= fill <= 255:
        raise ValueError(f"a padding code is a byte, not {fill}")
    if geo.stride == (1, 1) and geo.padding == (0, 0):
        return _flat_staging(geo, rows)  # no padding to fill: every staged word is a code
    pairs, n_pairs = phase_pairs(geo)
    if pairs is None:
        return None
    B, H = geo.batch, geo.height
    ph, pw = geo.padding
    sh, sw = geo.stride
    Cg = geo.in_per_group
    c_groups = -(-Cg // 4)
    planes = geo.groups * c_groups
    Wq = -(-geo.padded_w // sw)
    P0, P1, P2, P3 = pairs
    loop = staging_loop(geo)

    def channel_byte(x, b, cq, t, row, col):
        return _word_byte(lambda channel: x[b, channel, row, col], cq, t, c_groups, Cg)

    @T.macro
    def copy_segment(x, xs, b, cq, hq, a_h, a_w, lo, n):
        # Words of 4 consecutive channels for the valid columns of one staged row (none: a
        # phase of a narrow input that holds no input column).
        if n > 0 and 0 <= hq * sh + a_h - ph and hq * sh + a_h - ph < H:
            for part in range(_vector_runs(n)):
                for j in T.vectorized(_run_width(n)):
                    xs[b, cq, a_h, a_w, hq, lo + _run_start(part, n) + j] = (
                        channel_byte(x, b, cq, 0, hq * sh + a_h - ph, (lo + _run_start(part, n) + j) * sw + a_w - pw)
                        | channel_byte(x, b, cq, 1, hq * sh + a_h - ph, (lo + _run_start(part, n) + j) * sw + a_w - pw)
                        | channel_byte(x, b, cq, 2, hq * sh + a_h - ph, (lo + _run_start(part, n) + j) * sw + a_w - pw)
                        | channel_byte(x, b, cq, 3, hq * sh + a_h - ph, (lo + _run_start(part, n) + j) * sw + a_w - pw))

    @T.macro
    def copy_row(x, xs, b, cq, slot, hq, pair):
        if slot == pair[4]:
            for j in vector_loop(Wq):
                xs[b, cq, pair[0], pair[1], hq, j] = T.uint32(fill * 0x01010101)
            copy_segment(x, xs, b, cq, hq, pair[0], pair[1], pair[2], pair[3])

    @T.macro
    def stage(x, xs):
        for task in loop(B * planes * n_pairs * rows):
            copy_row(x, xs, task // (planes * n_pairs * rows), task // (n_pairs * rows) % planes,
                     task // rows % n_pairs, task % rows, P0)
            if n_pairs > 1:
                copy_row(x, xs, task // (planes * n_pairs * rows), task // (n_pairs * rows) % planes,
                         task // rows % n_pairs, task % rows, P1)
            if n_pairs > 2:
                copy_row(x, xs, task // (planes * n_pairs * rows), task // (n_pairs * rows) % planes,
                         task // rows % n_pairs, task % rows, P2)
            if n_pairs > 3:
                copy_row(x, xs, task // (planes * n_pairs * rows), task // (n_pairs * rows) % planes,
                         task // rows % n_pairs, task % rows, P3)

    return stage


def task_rows_staging(geo: ConvGeometry, rows: int, fill: int = 0):
    """A macro ``stage_rows(x, xt, b, g, first)`` filling a task's own staging, the flat uint32
    ``xt[ceil(Cg/4) * sh * sw * rows * Wq]`` laid out as ``[ceil(Cg/4), sh, sw, rows, Wq]``:
    :func:`phase_staging`'s words of batch ``b``, group ``g``, staged rows ``first .. first +
    rows - 1`` (``fill`` outside the input).

    A conv whose task stages the rows it reads keeps those words in its own core's cache: with
    one staging for all tasks, the calling thread rewrites at every call the lines the other
    threads read at the last one, and each such store waits for the other core to give up its
    copy. On a two-vCPU Zen 4 that made a ResNet-20 3x3 conv (16 channels, 32x32) as slow on two
    threads as on one (10.7 us; 6.3 with the staging's stores taken out). None for strides
    above 2."""
    if not 0 <= fill <= 255:
        raise ValueError(f"a padding code is a byte, not {fill}")
    pairs, n_pairs = phase_pairs(geo)
    if pairs is None:
        return None
    H = geo.height
    ph, pw = geo.padding
    sh, sw = geo.stride
    Cg = geo.in_per_group
    c_groups = -(-Cg // 4)
    Wq = -(-geo.padded_w // sw)
    P0, P1, P2, P3 = pairs

    def word(x, b, g, cq, row, col):
        def load(channel):
            return x[b, g * Cg + channel, row, col]
        return (_word_byte(load, cq, 0, c_groups, Cg) | _word_byte(load, cq, 1, c_groups, Cg)
                | _word_byte(load, cq, 2, c_groups, Cg) | _word_byte(load, cq, 3, c_groups, Cg))

    @T.macro
    def stage_row(x, xt, b, g, cq, first, i, pair):
        for j in vector_loop(Wq):
            xt[(((cq * sh + pair[0]) * sw + pair[1]) * rows + i) * Wq + j] = T.uint32(fill * 0x01010101)
        if pair[3] > 0 and 0 <= (first + i) * sh + pair[0] - ph and (first + i) * sh + pair[0] - ph < H:
            for part in range(_vector_runs(pair[3])):
                for j in T.vectorized(_run_width(pair[3])):
                    xt[(((cq * sh + pair[0]) * sw + pair[1]) * rows + i) * Wq + pair[2] + _run_start(part, pair[3]) + j] = word(
                        x, b, g, cq, (first + i) * sh + pair[0] - ph,
                        (pair[2] + _run_start(part, pair[3]) + j) * sw + pair[1] - pw)

    @T.macro
    def stage_rows(x, xt, b, g, first):
        for cq in range(c_groups):
            for i in range(rows):
                stage_row(x, xt, b, g, cq, first, i, P0)
                if n_pairs > 1:
                    stage_row(x, xt, b, g, cq, first, i, P1)
                if n_pairs > 2:
                    stage_row(x, xt, b, g, cq, first, i, P2)
                if n_pairs > 3:
                    stage_row(x, xt, b, g, cq, first, i, P3)

    return stage_rows


# Words a task of :func:`_flat_staging` writes: a few KiB, so a 56x56 plane is 4 tasks
_FLAT_CHUNK = 1024


def _flat_staging(geo: ConvGeometry, rows: int):
    """:func:`phase_staging` of an unstrided, unpadded conv (every 1x1 conv): one phase, whose
    rows are the input's, so each plane's words are one flat run over the ``H x W`` pixels
    (``rows - H`` zero rows after it). Tasks are runs of ``_FLAT_CHUNK`` words, the last run of a
    plane ending at its end (overlapping the one before it, writing the same words). A task per
    staged row, each row zeroed before it was filled, made MobileNetV2's 1x1 convs 4% slower
    (Zen 5, 2 threads, its 19 shapes: 271 -> 260 us; 144 -> 24 channels at 56x56 20.3 -> 18.2 us)."""
    B, C, H, W = geo.batch, geo.in_channels, geo.height, geo.width
    Cg = geo.in_per_group
    c_groups = -(-Cg // 4)
    planes = geo.groups * c_groups
    plane = H * W
    chunks = -(-plane // _FLAT_CHUNK)
    per_chunk = -(-plane // chunks)
    chunk = min(plane, -(-per_chunk // 16) * 16)  # whole vectors, at most the plane
    extra = (rows - H) * W
    loop = staging_loop(geo)

    def channel_byte(xf, task, t, j):
        """Byte t of task ``task``'s word ``j``."""
        start = T.min(task % chunks * chunk, plane - chunk)
        return _word_byte(lambda channel: xf[(task // (chunks * planes) * C + channel) * plane + start + j],
                          task // chunks % planes, t, c_groups, Cg)

    @T.macro
    def stage(x, xs):
        xf = T.decl_buffer((B * C * plane,), "uint8", data=x.data)
        xw = T.decl_buffer((B * planes * rows * W,), "uint32", data=xs.data)
        for task in loop(B * planes * chunks):
            for j in T.vectorized(chunk):
                xw[task // chunks * (rows * W) + T.min(task % chunks * chunk, plane - chunk) + j] = (
                    channel_byte(xf, task, 0, j) | channel_byte(xf, task, 1, j)
                    | channel_byte(xf, task, 2, j) | channel_byte(xf, task, 3, j))
            if extra > 0:
                if task % chunks == chunks - 1:
                    for j in vector_loop(extra):
                        xw[task // chunks * (rows * W) + plane + j] = T.uint32(0)

    return stage
