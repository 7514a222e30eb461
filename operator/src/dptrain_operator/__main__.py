from dptrain_operator.main import run

run()
