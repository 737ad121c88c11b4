"""Ray Serve deployments of coe: expert servers, the OpenAI ingress and the app builder."""
