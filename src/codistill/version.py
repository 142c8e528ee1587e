"""The package version, in a module of its own: run_log and cli read it without importing the
package's __init__ (which imports the whole component, and would close an import loop)."""

__version__ = "0.1.0"
