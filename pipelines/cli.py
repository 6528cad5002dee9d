def main(argv=None):
    print("vlaprep")
