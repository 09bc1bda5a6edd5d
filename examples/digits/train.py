"""Train the digits CNN (scikit-learn's bundled 8x8 digits) and write model + calibration/validation
data for edgepack. The code lives in packager/examples/digits.py so `edgepack demo` can use it too.

    python examples/digits/train.py [OUT_DIR] [--epochs N]
"""
import sys

from packager.examples.digits import main

if __name__ == "__main__":
    sys.exit(main())
