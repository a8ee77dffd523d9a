"""eartalk/data"""
