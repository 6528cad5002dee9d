"""vlaprep.pipelines"""
