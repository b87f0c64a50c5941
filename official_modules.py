"""Scratch: the authors' BiSeNet and ProjPlusModel at full size with random weights; save weights, inputs, outputs."""
import sys, types, importlib.util, torch, numpy as np
from PIL import Image
OFFICIAL = "/tmp/scratch-adaface/adaface"
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m
fn = load("cid_functions", f"{OFFICIAL}/ConsistentID/lib/functions.py")
pkg = types.ModuleType("bisenet_pkg"); pkg.__path__ = [f"{OFFICIAL}/ConsistentID/lib/BiSeNet"]; sys.modules["bisenet_pkg"] = pkg
rn = load("bisenet_pkg.resnet", f"{OFFICIAL}/ConsistentID/lib/BiSeNet/resnet.py"); rn.Resnet18.init_weight = lambda self: None  # no download
md = load("bisenet_pkg.model", f"{OFFICIAL}/ConsistentID/lib/BiSeNet/model.py")
torch.manual_seed(0)
net = md.BiSeNet(n_classes=19).eval()
with torch.no_grad():  # non-trivial BN statistics
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5); m.weight.normal_(1, 0.1); m.bias.normal_(0, 0.1)
torch.save(net.state_dict(), "/tmp/scratch-adaface/parity/bisenet_full.pth")
# ConsistentID's parse_face_mask preprocessing, written with torchvision's ToTensor/Normalize semantics
img = Image.open("/work/shared/data/faces/obama.jpg").convert("RGB")
x = np.asarray(img.resize((512, 512), Image.BILINEAR), dtype=np.float32) / 255.0
x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
x = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
with torch.no_grad():
    out, out16, out32 = net(x)
p = fn.ProjPlusModel(cross_attention_dim=768, id_embeddings_dim=512, clip_embeddings_dim=1280, num_tokens=4).eval()
with torch.no_grad():
    for n, prm in p.named_parameters():
        if "norm" in n and n.endswith("weight"): prm.normal_(1, 0.1)
        elif n.endswith("bias"): prm.normal_(0, 0.05)
ids = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1); clip = torch.randn(2, 257, 1280)
with torch.no_grad():
    pout = p(ids, clip)
torch.save({"image_proj": p.state_dict(), "FacialEncoder": {}, "adapter_modules": {}}, "/tmp/scratch-adaface/parity/consistentid_full.bin")
torch.save({"bisenet_in": x, "bisenet_out": out, "bisenet_out16": out16, "bisenet_out32": out32,
            "bisenet_labels": out.argmax(1)[0], "ids": ids, "clip": clip, "projplus_out": pout}, "/tmp/scratch-adaface/parity/official_modules.pt")
print("ok", out.shape, pout.shape)
