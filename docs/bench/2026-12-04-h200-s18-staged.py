"""Probe: a one-row GEMV whose program copies its whole weight slab into shared memory before its PDL wait."""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def staged_gemv_kernel(x_ptr, w_ptr, y_ptr, part_ptr, lock_ptr, N, K, tiles_per_split, splits,
                       BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TILES: gl.constexpr, PDL: gl.constexpr,
                       WAIT_EACH: gl.constexpr):
    TPW_K: gl.constexpr = BLOCK_K // 8
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [gl.num_warps(), 1], [1, 0])
    smem_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    t_lo = pid_k * tiles_per_split
    nt = gl.minimum(tiles_per_split, K // BLOCK_K - t_lo)
    k_lo = t_lo * BLOCK_K
    w_base = w_ptr + offs_n[:, None].to(gl.int64) * K + (k_lo + offs_k)[None, :]
    smem = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [TILES, BLOCK_N, BLOCK_K], smem_layout)
    for t in gl.static_range(TILES):
        live = (offs_k[None, :] * 0 + offs_n[:, None] * 0 + t) < nt
        cp.async_copy_global_to_shared(smem.index(t), w_base + t * BLOCK_K, mask=live)
        cp.commit_group()
    if PDL:
        _gdc_wait()
        _gdc_launch()
    if not WAIT_EACH:
        cp.wait_group(0)
    acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    for t in gl.static_range(TILES):
        x = gl.load(x_ptr + k_lo + t * BLOCK_K + offs_k, mask=(offs_k * 0 + t) < nt, other=0.0).to(gl.float32)
        if WAIT_EACH:
            cp.wait_group(TILES - 1 - t)
        w = smem.index(t).load(layout).to(gl.float32)
        acc += w * x[None, :]
    out = gl.sum(acc, axis=1)
    gl.store(part_ptr + pid_k * N + offs_n, out)
    gl.thread_barrier()
    lock = lock_ptr + pid_n
    arrived = gl.atomic_add(lock, 1, sem="acq_rel")
    if arrived == splits - 1:
        total = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, layout))
        for s in range(0, splits):
            total += gl.load(part_ptr + s * N + offs_n, cache_modifier=".cg")
        gl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty))
        gl.atomic_xchg(lock, 0)


def plan(n, k, sms, block_k=64, smem_bytes=220 * 1024, elem=2):
    """(block_n, splits, tiles_per_split, TILES) with every program resident and its slab in shared memory."""
    for block_n in (64, 32, 128, 16):
        if n % block_n or k % block_k:
            continue
        tiles = n // block_n
        ktiles = k // block_k
        splits = -(-tiles * ktiles * block_n * block_k * elem // smem_bytes) // tiles
        splits = max(1, -(-tiles * ktiles * block_n * block_k * elem // (smem_bytes * tiles)))
        per = -(-ktiles // splits)
        splits = -(-ktiles // per)
        if tiles * splits <= sms and per * block_n * block_k * elem <= smem_bytes:
            return block_n, splits, per, per
    return None


def staged_gemv(x, w, y, part, locks, cfg, pdl=False, wait_each=True, num_warps=4):
    block_n, splits, per, T = cfg
    n, k = w.shape
    staged_gemv_kernel[(n // block_n, splits)](x, w, y, part, locks, n, k, per, splits, BLOCK_N=block_n,
                                               BLOCK_K=64, TILES=T, PDL=pdl, WAIT_EACH=wait_each,
                                               num_warps=num_warps, **({"launch_pdl": True} if pdl else {}))
    return y


from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _clock():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _smid():
    return gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def tma_gemv_kernel(w_desc, x_ptr, y_ptr, part_ptr, lock_ptr, clock_ptr, N, K, tiles_per_split, splits,
                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TILES: gl.constexpr, PDL: gl.constexpr,
                    CLOCKS: gl.constexpr):
    TPW_K: gl.constexpr = BLOCK_K // 8
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [gl.num_warps(), 1], [1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    if CLOCKS:
        t_in = _clock()
    t_lo = pid_k * tiles_per_split
    nt = gl.minimum(tiles_per_split, K // BLOCK_K - t_lo)
    k_lo = t_lo * BLOCK_K
    smem = gl.allocate_shared_memory(w_desc.dtype, [TILES, BLOCK_N, BLOCK_K], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [TILES, 1], mbarrier.MBarrierLayout())
    for t in gl.static_range(TILES):
        mbarrier.init(bars.index(t), count=1)
    fence_async_shared()
    for t in gl.static_range(TILES):
        mbarrier.expect(bars.index(t), BLOCK_N * BLOCK_K * 2, pred=t < nt)
        tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, k_lo + t * BLOCK_K], bars.index(t),
                                        smem.index(t), pred=t < nt)
    if PDL:
        _gdc_wait()
        _gdc_launch()
    if CLOCKS:
        t_wait = _clock()
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, layout))
    # x's tiles are loaded 4 ahead of their use (a load a tile, each waiting on L2, was ~8 us of the kernel)
    xp = x_ptr + k_lo + offs_k
    x0 = gl.load(xp, mask=(offs_k * 0) < nt, other=0.0)
    x1 = gl.load(xp + BLOCK_K, mask=(offs_k * 0 + 1) < nt, other=0.0)
    x2 = gl.load(xp + 2 * BLOCK_K, mask=(offs_k * 0 + 2) < nt, other=0.0)
    x3 = gl.load(xp + 3 * BLOCK_K, mask=(offs_k * 0 + 3) < nt, other=0.0)
    acc = gl.zeros([BLOCK_N, BLOCK_K], gl.float32, layout)
    for t in range(0, nt):
        x = x0.to(gl.float32)[None, :]
        x0 = x1
        x1 = x2
        x2 = x3
        x3 = gl.load(xp + (t + 4) * BLOCK_K, mask=(offs_k * 0 + t + 4) < nt, other=0.0)
        mbarrier.wait(bars.index(t), 0)
        w = smem.index(t).load(layout).to(gl.float32)
        acc += w * x
    out = gl.sum(acc, axis=1)
    gl.store(part_ptr + pid_k * N + offs_n, out)
    gl.thread_barrier()
    lock = lock_ptr + pid_n
    arrived = gl.atomic_add(lock, 1, sem="acq_rel")
    if arrived == splits - 1:
        total = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, layout))
        for s in range(0, splits):
            total += gl.load(part_ptr + s * N + offs_n, cache_modifier=".cg")
        gl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty))
        gl.atomic_xchg(lock, 0)
    if CLOCKS:
        t_out = _clock()
        c = clock_ptr + (pid_k * gl.num_programs(0) + pid_n) * 4
        gl.store(c, t_in)
        gl.store(c + 1, t_wait)
        gl.store(c + 2, t_out)
        gl.store(c + 3, _smid().to(gl.int64))


_DESCS = {}


def tma_gemv(x, w, y, part, locks, cfg, pdl=False, num_warps=4, clocks=None, block_k=64, swizzle=128, maxnreg=None):
    block_n, splits, per, T = cfg
    n, k = w.shape
    key = (w.data_ptr(), block_n, block_k, swizzle)
    desc = _DESCS.get(key)
    if desc is None:
        desc = _DESCS[key] = TensorDescriptor(w, [n, k], [k, 1], [block_n, block_k],
                                              gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=2))
    return tma_gemv_kernel[(n // block_n, splits)](desc, x, y, part, locks, clocks if clocks is not None else locks, n, k,
                                                   per, splits, BLOCK_N=block_n, BLOCK_K=block_k, TILES=T, PDL=pdl,
                                                   CLOCKS=clocks is not None, num_warps=num_warps,
                                                   **({"maxnreg": maxnreg} if maxnreg else {}),
                                                   **({"launch_pdl": True} if pdl else {}))


@gluon.jit
def tma_load_only_kernel(w_desc, y_ptr, K, tiles_per_split, BR: gl.constexpr, BC: gl.constexpr, ROWS: gl.constexpr,
                         TILES: gl.constexpr):
    """Each program copies its [ROWS, tiles_per_split * BC] slab into shared memory in [BR, BC] boxes, waits, ends."""
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    RB: gl.constexpr = ROWS // BR
    t_lo = pid_k * tiles_per_split
    nt = gl.minimum(tiles_per_split, K // BC - t_lo)
    smem = gl.allocate_shared_memory(w_desc.dtype, [TILES * RB, BR, BC], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [TILES * RB, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(TILES * RB):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(TILES * RB):
        t = i // RB
        r = i % RB
        mbarrier.expect(bars.index(i), BR * BC * 2, pred=t < nt)
        tma.async_copy_global_to_shared(w_desc, [pid_n * ROWS + r * BR, (t_lo + t) * BC], bars.index(i),
                                        smem.index(i), pred=t < nt)
    for i in range(0, nt * RB):
        mbarrier.wait(bars.index(i), 0)
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    o = gl.arange(0, 32 * gl.num_warps(), layout=lay)
    gl.store(y_ptr + (pid_k * gl.num_programs(0) + pid_n) * 32 * gl.num_warps() + o, o.to(gl.float32))


def tma_load_only(w, y, br, bc, swizzle, rows=64, splits=3, num_warps=4):
    n, k = w.shape
    ktiles = k // bc
    per = -(-ktiles // splits)
    key = ("lo", w.data_ptr(), br, bc, swizzle)
    desc = _DESCS.get(key)
    if desc is None:
        desc = _DESCS[key] = TensorDescriptor(w, [n, k], [k, 1], [br, bc],
                                              gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=2))
    tma_load_only_kernel[(n // rows, splits)](desc, y, k, per, BR=br, BC=bc, ROWS=rows, TILES=per, num_warps=num_warps)
