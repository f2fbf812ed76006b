def qc_outputs():
    return []
