-- One V2 inference request per call, as a client application would send it.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1.2, 0.4, 2.0, 0.1]}]}'
