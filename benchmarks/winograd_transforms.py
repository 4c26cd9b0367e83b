r"""Milliseconds of the bfloat16 Winograd F(2x2) transforms alone, one thread, per ResNet-18 layer shape.

  python benchmarks/winograd_transforms.py [--batch 256] [--repeats 7]

Why: in a Winograd layer the transforms run between oneDNN matmuls, and a profile of the whole call
cannot separate them well. This builds a small C++ driver around contrastood/kernels/onednn_conv.cc
(the same source and -O3 as the kernel) and times the input transform (x -> V), the output
transform (M -> y) and the weight gradient's dy transform (dy -> dM) over a whole layer's chunks on
one thread, in four variants side by side in one process, alternating:
  even, exact     chunks of a power-of-two number of tiles, bfloat16 rounded as XLA rounds (before)
  odd, exact      odd chunks (OddChunks, what the kernel uses), the exact rounding
  even, one-insn  even chunks, VCVTNEPS2BF16 for the matmul's tiles (AVX512_BF16 CPUs only)
  odd, one-insn   what the kernel runs on AVX512_BF16 CPUs
Prints numbers (best of --repeats), asserts nothing. Needs g++ and libdnnl (as the kernel does).
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DRIVER = r"""
#include SOURCE
#include <chrono>
#include <cstdio>
#include <cstdlib>

// One layer: n images of h x h x c (c in and out), chunks of about 2^15 tile-channels as Wino2Forward's.
int main(int argc, char** argv) {
  const int64_t n = atoll(argv[1]), h = atoll(argv[2]), c = atoll(argv[3]), repeats = atoll(argv[4]);
  const int64_t tiles = n * (h / 2) * (h / 2), want = std::max<int64_t>(16, kThreadChunkBudget / c);
  const bool dot = contrastood_bf16_dot_stores(1);
  std::vector<uint16_t> x(n * h * h * c), y(n * h * h * c);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0x3f80 + (i % 97);  // bfloat16 values near 1
  const char* names[4] = {"even, exact", "odd, exact", "even, one-insn", "odd, one-insn"};
  double best[4][3];
  for (auto& b : best) b[0] = b[1] = b[2] = 1e30;
  std::vector<uint16_t> v;
  std::vector<float> m;
  for (int64_t r = 0; r < repeats; ++r)
    for (int k = 0; k < 4; ++k) {
      const int variant = r % 2 ? 3 - k : k;  // alternate the order, so drift hits all alike
      if (variant >= 2 && !dot) continue;
      contrastood_bf16_dot_stores(variant >= 2);
      const int64_t chunk = variant % 2 ? OddChunks(tiles, want) : EvenChunks(tiles, want);
      v.resize(16 * chunk * c);
      m.assign(16 * chunk * c, 0.5f);
      using clock = std::chrono::steady_clock;
      auto t0 = clock::now();
      for (int64_t a = 0; a < tiles; a += chunk)
        InputTransformBf16(x.data(), h, h, c, a, std::min(tiles, a + chunk), v.data(), false);
      auto t1 = clock::now();
      for (int64_t a = 0; a < tiles; a += chunk)
        OutputTransform<2>(m.data(), h, h, c, a, std::min(tiles, a + chunk), y.data(), false);
      auto t2 = clock::now();
      for (int64_t a = 0; a < tiles; a += chunk)
        GradTransformBf16(x.data(), h, h, c, a, std::min(tiles, a + chunk), v.data(), false);
      auto t3 = clock::now();
      const double ms[3] = {std::chrono::duration<double, std::milli>(t1 - t0).count(),
                            std::chrono::duration<double, std::milli>(t2 - t1).count(),
                            std::chrono::duration<double, std::milli>(t3 - t2).count()};
      for (int j = 0; j < 3; ++j) best[variant][j] = std::min(best[variant][j], ms[j]);
    }
  contrastood_bf16_dot_stores(1);
  for (int k = 0; k < 4; ++k) {
    if (k >= 2 && !dot) {
      printf("%4ldpx x%4ld  %-15s (no AVX512_BF16 on this CPU)\n", h, c, names[k]);
      continue;
    }
    const int64_t chunk = k % 2 ? OddChunks(tiles, want) : EvenChunks(tiles, want);
    printf("%4ldpx x%4ld  %-15s chunk %4ld tiles: input %7.2f  output %7.2f  dy %7.2f  sum %7.2f ms\n", h, c,
           names[k], chunk, best[k][0], best[k][1], best[k][2], best[k][0] + best[k][1] + best[k][2]);
  }
}
"""


def build(out_dir: str) -> str:
    import jax

    from contrastood import native, onednn_conv

    library = onednn_conv.find_library()
    if not library:
        sys.exit("libdnnl.so.3 not found (install onednn-cpu-gomp)")
    library = os.path.realpath(library)
    libdir, name = os.path.split(library)
    driver = os.path.join(out_dir, "driver.cc")
    with open(driver, "w") as f:
        f.write(DRIVER.replace("SOURCE", f'"{onednn_conv.SOURCE}"'))
    binary = os.path.join(out_dir, "driver")
    command = [native.compiler(), "-O3", "-std=c++17", "-fopenmp", "-Wno-return-type", "-Wno-psabi",
               f"-I{jax.ffi.include_dir()}", driver, "-o", binary, f"-L{libdir}", f"-l:{name}",
               f"-Wl,-rpath,{libdir}"]
    subprocess.run(command, check=True)
    return binary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    from contrastood import perf

    print(f"CPU {perf.cpu_identity()['cpu']}; batch {args.batch}, one thread, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(tmp)
        for size, channels in ((32, 64), (16, 128), (8, 256), (4, 512)):  # ResNet-18's Winograd layers
            subprocess.run([binary, str(args.batch), str(size), str(channels), str(args.repeats)], check=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
