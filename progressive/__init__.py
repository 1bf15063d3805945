"""progressive"""
