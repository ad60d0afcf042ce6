"""torchbilevel: hypergradients and bilevel optimisers for PyTorch."""
__version__ = "0.1.0"
