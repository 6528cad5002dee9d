"""vlaprep.schemas"""
