"""TiDAR's attention layouts: the training and decode-step masks and positions, and sparse proposal sets.

Pure functions of static shapes; nothing here imports the rest of the project.
"""
