package kube

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// API lists and watches the core API group's resources smeshd reads:
// "pods" and "namespaces", across all namespaces.
type API interface {
	List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error)
	Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error)
}

// restAPI is API over a REST client whose scheme knows the core group
// only. It makes the requests client-go's typed core client makes
// (GET /api/v1/pods?fieldSelector=...&watch=true ...).
type restAPI struct {
	c      *rest.RESTClient
	params runtime.ParameterCodec
}

// NewAPI returns the API of the server rc reaches.
func NewAPI(rc *rest.Config) (API, error) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("kubernetes scheme: %w", err)
	}
	cfg := rest.CopyConfig(rc)
	cfg.APIPath = "/api"
	cfg.GroupVersion = &corev1.SchemeGroupVersion
	cfg.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	c, err := rest.RESTClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return restAPI{c: c, params: runtime.NewParameterCodec(scheme)}, nil
}

func (a restAPI) List(ctx context.Context, resource string, opts metav1.ListOptions) (runtime.Object, error) {
	var into runtime.Object
	switch resource {
	case "pods":
		into = &corev1.PodList{}
	case "namespaces":
		into = &corev1.NamespaceList{}
	default:
		return nil, fmt.Errorf("kubernetes: listing %s is not supported", resource)
	}
	req := a.c.Get().Resource(resource).VersionedParams(&opts, a.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	if err := req.Do(ctx).Into(into); err != nil {
		return nil, err
	}
	return into, nil
}

func (a restAPI) Watch(ctx context.Context, resource string, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	req := a.c.Get().Resource(resource).VersionedParams(&opts, a.params)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	return req.Watch(ctx)
}
