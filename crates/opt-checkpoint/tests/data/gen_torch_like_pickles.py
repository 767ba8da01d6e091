# Test data generator for opt-checkpoint (run: python3 gen_torch_like_pickles.py in this folder).
# Writes hf_like.bin and metaseq_like.pt, small PyTorch-style zip checkpoints.
# Emulates torch.save's pickling (protocol 2, persistent ids for storages,
# _rebuild_tensor_v2 reduce) without torch, by registering fake modules.
import sys, types, pickle, io, collections, zipfile, struct
torch = types.ModuleType("torch"); utils = types.ModuleType("torch._utils")
sys.modules["torch"] = torch; sys.modules["torch._utils"] = utils
torch._utils = utils
def _rebuild_tensor_v2(*a): pass
_rebuild_tensor_v2.__module__ = "torch._utils"; _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
def _rebuild_parameter(*a): pass
_rebuild_parameter.__module__ = "torch._utils"; _rebuild_parameter.__qualname__ = "_rebuild_parameter"
utils._rebuild_parameter = _rebuild_parameter
class FloatStorage: pass
FloatStorage.__module__ = "torch"; torch.FloatStorage = FloatStorage
class BFloat16Storage: pass
BFloat16Storage.__module__ = "torch"; torch.BFloat16Storage = BFloat16Storage
class Storage:
    def __init__(self, ty, key, numel, data): self.ty, self.key, self.numel, self.data = ty, key, numel, data
class Tensor:
    def __init__(self, storage, offset, size, stride): self.s, self.o, self.size, self.stride = storage, offset, size, stride
    def __reduce_ex__(self, proto):
        return (_rebuild_tensor_v2, (self.s, self.o, tuple(self.size), tuple(self.stride), False, collections.OrderedDict()))
class Param:
    def __init__(self, t): self.t = t
    def __reduce_ex__(self, proto):
        return (_rebuild_parameter, (self.t, True, collections.OrderedDict()))
class P(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.ty, obj.key, "cpu", obj.numel)
        return None
def save(obj, storages, path, prefix="archive"):
    buf = io.BytesIO(); P(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        z.writestr(f"{prefix}/byteorder", "little")
        for s in storages: z.writestr(f"{prefix}/data/{s.key}", s.data)
        z.writestr(f"{prefix}/version", "3\n")
    return buf.getvalue()

# state dict: w = 2x3 f32 [0..6), b = view of the same storage at offset 6 (len 2),
# wt = transposed view of w (3x2, stride (1,3)), p = Parameter bf16 [4]
f32 = struct.pack("<8f", *[float(i) for i in range(8)])
s0 = Storage(FloatStorage, "0", 8, f32)
def bf16(x): return struct.pack("<f", x)[2:4]
bfd = b"".join(bf16(v) for v in [1.0, 2.0, 3.0, -4.0])
s1 = Storage(BFloat16Storage, "1", 4, bfd)
sd = collections.OrderedDict()
sd["w"] = Tensor(s0, 0, [2, 3], [3, 1])
sd["b"] = Tensor(s0, 6, [2], [1])
sd["wt"] = Tensor(s0, 0, [3, 2], [1, 3])
sd["p"] = Param(Tensor(s1, 0, [4], [1]))
sd._metadata = collections.OrderedDict([("", {"version": 1})])
pkl = save(sd, [s0, s1], "hf_like.bin", prefix="pytorch_model")
top = {"model": sd, "cfg": {"lr": 0.1, "name": "x"}, "optimizer_history": [{"num_updates": 3}]}
pkl2 = save(top, [s0, s1], "metaseq_like.pt")
