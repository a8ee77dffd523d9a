"""kernels_cu"""
