"""vlaprep.transforms"""
