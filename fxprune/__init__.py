"""fxprune"""
