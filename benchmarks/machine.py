"""What machine a benchmark ran on: its figures mean little without it."""

import os
import platform


def cpu_description() -> str:
  """'<model name> xN (amx_bf16, avx512_bf16)' from /proc/cpuinfo, or the platform's guess.

  AMX decides whether bfloat16 matmuls are ~5x or ~2x faster than float32 on these
  machines, so every CPU figure is printed next to it.
  """
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return f"{platform.processor() or 'unknown CPU'} x{os.cpu_count()}"
  name = next((l.split(":", 1)[1].strip() for l in info.splitlines()
               if l.startswith("model name")), "unknown CPU")
  flags_line = next((l for l in info.splitlines() if l.startswith("flags")), "")
  extras = [f for f in ("amx_bf16", "avx512_bf16") if f" {f}" in flags_line]
  return f"{name} x{os.cpu_count()} ({', '.join(extras) or 'no AMX/AVX512-BF16'})"
