"""MLflow "models from code" entry: MLflow runs this file to build the logged pyfunc model.

Given to ``mlflow.pyfunc.log_model(python_model=<this file>)`` instead of a pickled object, so
a logged model holds no pickle: loading it imports :mod:`models.pyfunc` from the model's own
copy of this package.
"""

import mlflow.models

from models.pyfunc import ExpectedUsagePyfunc

mlflow.models.set_model(ExpectedUsagePyfunc())
