"""eartalk/commands"""
