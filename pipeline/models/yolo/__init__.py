"""yolo"""
