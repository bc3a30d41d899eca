"""Test setup: CPU only, cheap XLA compiles, the repository root importable without installing.

Tests run tiny shapes, so compile time dominates: XLA's backend optimisations are turned down (about
1.7x less CPU for the attention tests). Memory analyses stay deterministic; timings are never asserted.
Set before JAX initialises; subprocess tests that need fake devices set their own XLA_FLAGS.
"""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FAST_COMPILE).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
