"""The policy used when the user gives none: a DestinationRule and VirtualService in the
form Alibaba ASM documents for ModelMesh dynamic subsets, so the same YAML works here."""

SEED_POLICY_YAML = """\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: modelmesh-serving, namespace: modelmesh-serving}
spec:
  host: modelmesh-serving
  trafficPolicy:
    loadBalancer:
      dynamicSubset:
        subsetSelectors:
        - fallbackPolicy: ANY_ENDPOINT
          keys: [modelmesh.asm.alibabacloud.com]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: vs-modelmesh-serving-service, namespace: modelmesh-serving}
spec:
  gateways: [grpc-gateway]
  hosts: ['*']
  http:
  - headerToDynamicSubsetKey:
    - header: model
      key: modelmesh.asm.alibabacloud.com
    match:
    - port: 8008
    name: default
    route:
    - destination:
        host: modelmesh-serving
        port: {number: 8033}
"""
